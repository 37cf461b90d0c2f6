//! An instance's Backup and Restoration page, with RDS's tabs: Base Backups
//! (data and log backup lists with time filters and paging), Backup Strategy
//! (the policy form), Restore and Storage; and the Backup Instance button.
//! Lists and changes go through the API's actions.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use axum::Form;
use chrono::{DateTime, Duration, Utc};
use maud::{html, Markup};
use serde::Deserialize;
use serde_json::{Map, Value};
use strata_api::ApiError;
use strata_catalog::{BackupPolicy, BackupStatus, Instance};
use strata_service::policy::{self, format_minutes, WEEKDAYS};

use crate::layout::{self, api_time, badge, bytes, sort_th, state_kind, time, Section};
use crate::session::{Flash, Signed};
use crate::{csrf_ok, csrf_refused, html_response, url_encode, ConsoleState, Fields, Page};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Tab {
    Backups,
    Strategy,
    Restore,
    Storage,
}

const TABS: [(Tab, &str, &str); 4] = [
    (Tab::Backups, "backups", "Base Backups"),
    (Tab::Strategy, "strategy", "Backup Strategy"),
    (Tab::Restore, "restore", "Restore"),
    (Tab::Storage, "storage", "Storage"),
];

fn base(id: &str) -> String {
    format!("/console/instances/{}", url_encode(id))
}

/// The instance, or the error for the page saying it does not exist.
fn load(state: &ConsoleState, id: &str) -> Result<Instance, ApiError> {
    Ok(state.service.engine.catalog.get_instance(id)?)
}

fn missing(page: &Page, e: ApiError) -> Response {
    html_response(
        e.status,
        layout::page(
            "Instance not found",
            Some(&page.who),
            Section::Instances,
            None,
            html! {
                (layout::error_box("", &e))
                p { a href=(crate::HOME) { "Back to the instances" } }
            },
        ),
    )
}

/// Title, facts, the Backup Instance button and the tabs.
fn head(state: &ConsoleState, who: &Signed, inst: &Instance, tab: Tab) -> Markup {
    let svc = &state.service;
    let receiver = strata_api::receiver_status(svc, &inst.id).unwrap_or_else(|e| e.message);
    let window = svc.recovery_window(&inst.id).ok().flatten();
    let b = base(&inst.id);
    html! {
        nav.crumbs aria-label="Breadcrumb" { a href=(crate::HOME) { "Instances" } " › " span { (inst.id) } }
        div.pagehead {
            div {
                h1 { (inst.id) }
                p.facts {
                    span { "PostgreSQL " (layout::pg_version(inst.pg_version_num)) }
                    span { code { (inst.host) ":" (inst.port) } }
                    span { "Log backup: " span class=(format!("dot {}", state_kind(&receiver))) {} span title=(receiver) { (receiver.split(':').next().unwrap_or("")) } }
                    span {
                        "Recoverable window: "
                        @match window {
                            Some((from, to)) => { (time(from)) " – " (time(to)) }
                            None => { span.muted { "none" } }
                        }
                    }
                }
            }
            @if !who.read_only {
                div.headactions {
                    a.button.ghost href=(format!("/console/tasks?instance={}", url_encode(&inst.id))) { "Tasks" }
                    button.primary type="button" data-open="backup-dialog" { "Backup Instance" }
                }
                dialog #backup-dialog aria-labelledby="backup-dialog-title" {
                    form method="post" action=(format!("{b}/backup")) {
                        (layout::csrf(who))
                        h2 #backup-dialog-title { "Backup Instance" }
                        p { "Start a full physical backup of " strong { (inst.id) } " now?" }
                        p.muted { "It runs beside the automatic schedule; follow it in the Task Center." }
                        div.actions {
                            button.ghost type="button" data-close { "Cancel" }
                            button.primary type="submit" { "OK" }
                        }
                    }
                }
            } @else {
                div.headactions {
                    a.button.ghost href=(format!("/console/tasks?instance={}", url_encode(&inst.id))) { "Tasks" }
                }
            }
        }
        nav.tabs aria-label="Backup and Restoration" {
            @for (t, path, label) in TABS {
                a href=(format!("{b}/{path}")) aria-current=[(t == tab).then_some("page")] { (label) }
            }
        }
    }
}

fn render(
    state: &ConsoleState,
    page: Page,
    inst: &Instance,
    tab: Tab,
    status: StatusCode,
    body: Markup,
) -> Response {
    let label = TABS.iter().find(|t| t.0 == tab).map(|t| t.2).unwrap_or("");
    let markup = html! {
        (head(state, &page.who, inst, tab))
        section.tabpanel { (body) }
    };
    html_response(
        status,
        layout::page(
            &format!("{label} · {}", inst.id),
            Some(&page.who),
            Section::Instances,
            page.flash,
            markup,
        ),
    )
}

// ----- Backup Instance -----

/// `POST /console/instances/{id}/backup`: `CreateBackup`.
pub async fn backup_now(
    State(state): State<Arc<ConsoleState>>,
    Path(id): Path<String>,
    page: Page,
    Form(form): Form<Vec<(String, String)>>,
) -> Response {
    if !csrf_ok(&page.who, &Fields(form)) {
        return csrf_refused(&page.who);
    }
    match state
        .call(
            &page.who,
            "CreateBackup",
            vec![("DBInstanceId", id.clone())],
        )
        .await
    {
        Ok(answer) => {
            let job = answer
                .get("BackupJobId")
                .and_then(Value::as_str)
                .unwrap_or("?");
            state.flash(
                &page.who,
                Flash::Done {
                    text: format!("Backup task {job} of {id} started."),
                    link: Some((
                        format!("/console/tasks?instance={}", url_encode(&id)),
                        "Follow it in the Task Center".into(),
                    )),
                },
            );
        }
        Err(e) => state.flash_error(&page.who, "The backup did not start:", &e),
    }
    Redirect::to(&format!("{}/backups", base(&id))).into_response()
}

// ----- Base Backups -----

#[derive(Debug, Default, Deserialize)]
pub struct ListQuery {
    #[serde(default)]
    view: String,
    #[serde(default)]
    from: String,
    #[serde(default)]
    to: String,
    #[serde(default)]
    size: String,
    #[serde(default)]
    page: String,
}

/// A count from an answer (some actions give numbers as strings).
fn count(v: Option<&Value>) -> u64 {
    match v {
        Some(Value::Number(n)) => n.as_u64().unwrap_or(0),
        Some(Value::String(s)) => s.parse().unwrap_or(0),
        _ => 0,
    }
}

fn text<'a>(item: &'a Value, key: &str) -> &'a str {
    item.get(key).and_then(Value::as_str).unwrap_or("")
}

fn items<'a>(answer: &'a Map<String, Value>, list: &str, item: &str) -> Vec<&'a Value> {
    answer
        .get(list)
        .and_then(|l| l.get(item))
        .and_then(Value::as_array)
        .map(|a| a.iter().collect())
        .unwrap_or_default()
}

/// `GET /console/instances/{id}/backups`.
pub async fn backups(
    State(state): State<Arc<ConsoleState>>,
    Path(id): Path<String>,
    page: Page,
    Query(mut q): Query<ListQuery>,
) -> Response {
    let inst = match load(&state, &id) {
        Ok(i) => i,
        Err(e) => return missing(&page, e),
    };
    let log = q.view == "log";
    if q.size.is_empty() {
        q.size = "30".into();
    }
    if q.page.is_empty() {
        q.page = "1".into();
    }
    if log && q.from.is_empty() && q.to.is_empty() {
        // DescribeBinlogFiles needs a range: the log retention period.
        let now = state.service.now();
        let days = state
            .service
            .policy(&inst.id)
            .map(|p| p.log_retention_days)
            .unwrap_or(policy::DEFAULT_RETENTION_DAYS);
        q.from = format_minutes(now - Duration::days(days as i64));
        q.to = format_minutes(now + Duration::minutes(1));
    }
    let params = vec![
        ("DBInstanceId", inst.id.clone()),
        ("StartTime", q.from.clone()),
        ("EndTime", q.to.clone()),
        ("PageSize", q.size.clone()),
        ("PageNumber", q.page.clone()),
    ];
    let action = if log {
        "DescribeBinlogFiles"
    } else {
        "DescribeBackups"
    };
    let answer = state.call(&page.who, action, params).await;
    let b = base(&inst.id);
    let body = html! {
        nav.subtabs aria-label="Backup type" {
            a href=(format!("{b}/backups")) aria-current=[(!log).then_some("page")] { "Data Backup" }
            a href=(format!("{b}/backups?view=log")) aria-current=[log.then_some("page")] { "Log Backup" }
        }
        (filters(&b, &q, log))
        @match &answer {
            Err(e) => { (layout::error_box("The list could not be shown:", e)) }
            Ok(a) if log => { (log_list(a)) (pager(&b, &q, a)) }
            Ok(a) => { (data_list(a)) (pager(&b, &q, a)) }
        }
    };
    let status = match &answer {
        Err(e) => e.status,
        Ok(_) => StatusCode::OK,
    };
    render(&state, page, &inst, Tab::Backups, status, body)
}

fn filters(base: &str, q: &ListQuery, log: bool) -> Markup {
    html! {
        form.filters.timefilter method="get" action=(format!("{base}/backups")) {
            @if log { input type="hidden" name="view" value="log"; }
            label.field {
                span { "From" }
                input type="datetime-local" data-utc-for="from";
            }
            input type="hidden" name="from" value=(q.from);
            label.field {
                span { "To" }
                input type="datetime-local" data-utc-for="to";
            }
            input type="hidden" name="to" value=(q.to);
            label.field {
                span { "Page size" }
                select name="size" {
                    @for s in ["30", "50", "100"] {
                        option value=(s) selected[q.size == s] { (s) }
                    }
                }
            }
            button.secondary type="submit" { "Search" }
            @if !q.from.is_empty() || !q.to.is_empty() {
                a.button.ghost href=(format!("{base}/backups{}", if log { "?view=log" } else { "" })) { "Reset" }
            }
        }
    }
}

fn pager(base: &str, q: &ListQuery, answer: &Map<String, Value>) -> Markup {
    let total = count(answer.get("TotalRecordCount"));
    let size: u64 = q.size.parse().unwrap_or(30).max(1);
    let number: u64 = q.page.parse().unwrap_or(1).max(1);
    let pages = total.div_ceil(size).max(1);
    let link = |n: u64| {
        let mut url = format!(
            "{base}/backups?size={}&page={n}&from={}&to={}",
            url_encode(&q.size),
            url_encode(&q.from),
            url_encode(&q.to)
        );
        if q.view == "log" {
            url.push_str("&view=log");
        }
        url
    };
    html! {
        nav.pager aria-label="Pages" {
            span.muted { (total) " in all · page " (number) " of " (pages) }
            @if number > 1 { a.button.ghost href=(link(number - 1)) rel="prev" { "‹ Previous" } }
            @if number < pages { a.button.ghost href=(link(number + 1)) rel="next" { "Next ›" } }
        }
    }
}

fn data_list(answer: &Map<String, Value>) -> Markup {
    let rows = items(answer, "Items", "Backup");
    let stored = count(answer.get("TotalEcsSnapshotSize"));
    html! {
        p.summary { "Backup sets of this instance hold " strong { (bytes(stored)) } " in the repository." }
        div.card.tablewrap {
            table.data.sortable #data-backups {
                thead { tr {
                    (sort_th("Backup Set ID", "text"))
                    (sort_th("Start Time", "num"))
                    (sort_th("End Time", "num"))
                    (sort_th("Method", "text"))
                    (sort_th("Type", "text"))
                    (sort_th("Mode", "text"))
                    (sort_th("Size", "num"))
                    (sort_th("Status", "text"))
                    th scope="col" { "Download" }
                } }
                tbody {
                    @for b in &rows {
                        @let status = text(b, "BackupStatus");
                        tr data-backup=(text(b, "BackupId")) {
                            td data-v=(text(b, "BackupId")) { code { (text(b, "BackupId")) } }
                            td data-v=(layout::sort_time(layout::parse_api_time(text(b, "BackupStartTime")))) { (api_time(text(b, "BackupStartTime"))) }
                            td data-v=(layout::sort_time(layout::parse_api_time(text(b, "BackupEndTime")))) { (api_time(text(b, "BackupEndTime"))) }
                            td { (text(b, "BackupMethod")) }
                            td { (text(b, "BackupType")) }
                            td { (text(b, "BackupMode")) }
                            td data-v=(count(b.get("BackupSize"))) {
                                (bytes(count(b.get("BackupSize"))))
                                div.sub { "stored " (bytes(count(b.get("StrataStoredSize")))) }
                            }
                            td data-v=(status) {
                                (badge(state_kind(status), status))
                                @if let Some(e) = b.get("StrataErrorMessage").and_then(Value::as_str) {
                                    div.sub.err-text { (e) }
                                }
                            }
                            td { span.muted title="Downloads are not available in this version of Strata" { "—" } }
                        }
                    }
                }
            }
            @if rows.is_empty() {
                p.empty { "No backup sets in this range." }
            }
        }
    }
}

fn log_list(answer: &Map<String, Value>) -> Markup {
    let rows = items(answer, "Items", "BinLogFile");
    html! {
        p.summary { "WAL files in this range: " strong { (bytes(count(answer.get("TotalFileSize")))) } "." }
        div.card.tablewrap {
            table.data.sortable #log-backups {
                thead { tr {
                    (sort_th("Log File", "text"))
                    (sort_th("Begin Time", "num"))
                    (sort_th("End Time", "num"))
                    (sort_th("Size", "num"))
                    (sort_th("Status", "text"))
                    th scope="col" { "Download" }
                } }
                tbody {
                    @for w in &rows {
                        @let status = text(w, "RemoteStatus");
                        tr {
                            td data-v=(text(w, "LogFileName")) {
                                code title=(format!("timeline {} · LSN {} – {} · checksum {}", count(w.get("StrataTimeline")), text(w, "StrataBeginLsn"), text(w, "StrataEndLsn"), text(w, "Checksum"))) { (text(w, "LogFileName")) }
                            }
                            td data-v=(layout::sort_time(layout::parse_api_time(text(w, "LogBeginTime")))) { (api_time(text(w, "LogBeginTime"))) }
                            td data-v=(layout::sort_time(layout::parse_api_time(text(w, "LogEndTime")))) { (api_time(text(w, "LogEndTime"))) }
                            td data-v=(count(w.get("FileSize"))) { (bytes(count(w.get("FileSize")))) }
                            td data-v=(status) { (badge(state_kind(status), status)) }
                            td { span.muted title="Downloads are not available in this version of Strata" { "—" } }
                        }
                    }
                }
            }
            @if rows.is_empty() {
                p.empty { "No log backup files in this range." }
            }
        }
    }
}

// ----- Backup Strategy -----

/// The policy form's values, as stored or as submitted.
#[derive(Debug, Clone)]
struct Strategy {
    days: Vec<String>,
    window: String,
    retention: String,
    log_on: bool,
    log_retention: String,
}

impl Strategy {
    fn of(p: &BackupPolicy) -> Strategy {
        Strategy {
            days: p.backup_days.clone(),
            window: p.backup_window.clone(),
            retention: p.backup_retention_days.to_string(),
            log_on: p.log_backup_enabled,
            log_retention: p.log_retention_days.to_string(),
        }
    }

    fn from_form(f: &Fields) -> Strategy {
        Strategy {
            days: f.all("day").into_iter().map(str::to_string).collect(),
            window: f.get("window").to_string(),
            retention: f.get("retention").trim().to_string(),
            log_on: f.get("log_backup") == "on",
            log_retention: f.get("log_retention").trim().to_string(),
        }
    }

    /// `ModifyBackupPolicy`'s parameters for these values.
    fn params(&self, instance_id: &str) -> Vec<(&'static str, String)> {
        vec![
            ("DBInstanceId", instance_id.to_string()),
            ("PreferredBackupPeriod", self.days.join(",")),
            ("PreferredBackupTime", self.window.clone()),
            ("BackupRetentionPeriod", self.retention.clone()),
            (
                "EnableBackupLog",
                if self.log_on { "True" } else { "False" }.into(),
            ),
            ("LogBackupRetentionPeriod", self.log_retention.clone()),
        ]
    }

    /// The API reads an empty parameter as "keep the current value"; a form
    /// field left empty is a mistake instead, refused with the error the
    /// service's own parser gives for it.
    fn blank_field_error(&self) -> Option<ApiError> {
        if self.days.is_empty() {
            return policy::parse_days("").err().map(ApiError::from);
        }
        if self.window.trim().is_empty() {
            return policy::parse_window("").err().map(ApiError::from);
        }
        if self.retention.is_empty() {
            return policy::parse_days_count(
                "",
                "InvalidBackupRetentionPeriod.Malformed",
                "BackupRetentionPeriod",
            )
            .err()
            .map(ApiError::from);
        }
        if self.log_retention.is_empty() {
            return policy::parse_days_count(
                "",
                "InvalidLogBackupRetentionPeriod.Malformed",
                "LogBackupRetentionPeriod",
            )
            .err()
            .map(ApiError::from);
        }
        None
    }
}

/// Which field an API error belongs under.
fn error_field(code: &str) -> &'static str {
    match code {
        "InvalidPreferredBackupPeriod.Malformed" => "days",
        "InvalidPreferredBackupTime.Malformed" => "window",
        "InvalidBackupRetentionPeriod.Malformed" => "retention",
        "InvalidLogBackupRetentionPeriod.Malformed" | "InvalidParameterCombination" => {
            "log_retention"
        }
        _ => "",
    }
}

/// `GET /console/instances/{id}/strategy`.
pub async fn strategy(
    State(state): State<Arc<ConsoleState>>,
    Path(id): Path<String>,
    page: Page,
) -> Response {
    let inst = match load(&state, &id) {
        Ok(i) => i,
        Err(e) => return missing(&page, e),
    };
    let body = match state.service.policy(&inst.id) {
        Ok(p) => strategy_form(&state, &page.who, &inst, &p, &Strategy::of(&p), None, false),
        Err(e) => layout::error_box("The policy could not be read:", &e.into()),
    };
    render(&state, page, &inst, Tab::Strategy, StatusCode::OK, body)
}

/// `POST /console/instances/{id}/strategy`: `ModifyBackupPolicy`, after the
/// user confirmed turning log backup off.
pub async fn save_strategy(
    State(state): State<Arc<ConsoleState>>,
    Path(id): Path<String>,
    page: Page,
    Form(form): Form<Vec<(String, String)>>,
) -> Response {
    let form = Fields(form);
    if !csrf_ok(&page.who, &form) {
        return csrf_refused(&page.who);
    }
    let inst = match load(&state, &id) {
        Ok(i) => i,
        Err(e) => return missing(&page, e),
    };
    let current = match state.service.policy(&inst.id) {
        Ok(p) => p,
        Err(e) => {
            let body = layout::error_box("The policy could not be read:", &e.into());
            return render(
                &state,
                page,
                &inst,
                Tab::Strategy,
                StatusCode::INTERNAL_SERVER_ERROR,
                body,
            );
        }
    };
    let values = Strategy::from_form(&form);
    let turning_off = current.log_backup_enabled && !values.log_on;
    if turning_off && !page.who.read_only && form.get("confirm_log_off") != "yes" {
        let body = strategy_form(&state, &page.who, &inst, &current, &values, None, true);
        return render(&state, page, &inst, Tab::Strategy, StatusCode::OK, body);
    }
    let outcome = match values.blank_field_error() {
        Some(e) if !page.who.read_only => Err(e),
        _ => {
            state
                .call(&page.who, "ModifyBackupPolicy", values.params(&inst.id))
                .await
        }
    };
    match outcome {
        Ok(_) => {
            let text = if turning_off {
                "Backup policy saved. Log backup is off: log backups were deleted and point-in-time recovery has ended."
            } else {
                "Backup policy saved."
            };
            state.flash(
                &page.who,
                Flash::Done {
                    text: text.into(),
                    link: None,
                },
            );
            Redirect::to(&format!("{}/strategy", base(&inst.id))).into_response()
        }
        Err(e) => {
            let status = e.status;
            let body = strategy_form(&state, &page.who, &inst, &current, &values, Some(&e), false);
            render(&state, page, &inst, Tab::Strategy, status, body)
        }
    }
}

fn field_error(error: Option<&ApiError>, field: &str) -> Markup {
    html! {
        @if let Some(e) = error.filter(|e| error_field(&e.code) == field) {
            p.fielderror role="alert" id=(format!("{field}-error")) { (e.message) " " span.code { (e.code) } }
        }
    }
}

/// The one-hour windows offered: every hour, plus the current one if it
/// starts off the hour.
fn windows(current: &str) -> Vec<String> {
    let mut all: Vec<String> = (0..24)
        .map(|h| format!("{:02}:00Z-{:02}:00Z", h, (h + 1) % 24))
        .collect();
    if !current.is_empty() && !all.iter().any(|w| w == current) {
        all.insert(0, current.to_string());
    }
    all
}

fn window_label(w: &str) -> String {
    w.replace("Z-", "–").replace('Z', " UTC")
}

#[allow(clippy::too_many_arguments)]
fn strategy_form(
    state: &ConsoleState,
    who: &Signed,
    inst: &Instance,
    stored: &BackupPolicy,
    v: &Strategy,
    error: Option<&ApiError>,
    confirm_log_off: bool,
) -> Markup {
    let ro = who.read_only;
    let next = policy::next_backup_time(stored, state.service.now());
    html! {
        @match error {
            Some(e) if error_field(&e.code).is_empty() => {
                (layout::error_box("The policy was not saved:", e))
            }
            Some(_) => {
                div.notice.err role="alert" { "The policy was not saved: correct the field marked below." }
            }
            None => {}
        }
        @if ro {
            p.notice.info { "This AccessKey is read-only: the policy is shown, not editable." }
        }
        form.strategy method="post" action=(format!("{}/strategy", base(&inst.id))) novalidate
            data-log-was-on=(if stored.log_backup_enabled { "true" } else { "false" }) {
            (layout::csrf(who))
            @if confirm_log_off {
                div.notice.warn role="alert" #log-off-confirm {
                    p { strong { "Turn off log backup?" } }
                    p { (LOG_OFF_WARNING) }
                    div.actions {
                        a.button.ghost href=(format!("{}/strategy", base(&inst.id))) { "Keep log backup on" }
                        button.danger type="submit" name="confirm_log_off" value="yes" { "Turn off log backup" }
                    }
                }
            }
            fieldset.card disabled[ro] {
                legend { "Data Backup Settings" }
                div.field {
                    label for="retention" { "Data Backup Retention (Days)" }
                    input #retention name="retention" inputmode="numeric" value=(v.retention)
                        aria-invalid=[error.filter(|e| error_field(&e.code) == "retention").map(|_| "true")];
                    p.hint { "7 to 730 days." }
                    (field_error(error, "retention"))
                }
                div.field role="group" aria-labelledby="days-label" {
                    span.label #days-label { "Backup Cycle" }
                    div.days {
                        @for d in WEEKDAYS {
                            label.check {
                                input type="checkbox" name="day" value=(d) checked[v.days.iter().any(|x| x == d)];
                                span { (d) }
                            }
                        }
                    }
                    p.hint { "Select at least two days for data safety." }
                    (field_error(error, "days"))
                }
                div.field {
                    label for="window" { "Backup Time" }
                    select #window name="window" {
                        @for w in windows(&v.window) {
                            option value=(w) selected[w == v.window] data-window=(w) { (window_label(&w)) }
                        }
                    }
                    p.hint { "A one-hour window in UTC; the script shows your local time beside it." }
                    (field_error(error, "window"))
                }
                div.field {
                    span.label { "Next Automatic Backup" }
                    p.value {
                        @match next {
                            Some(t) => { (time(t)) }
                            None => { span.muted { "not scheduled" } }
                        }
                    }
                }
            }
            fieldset.card disabled[ro] {
                legend { "Log Backup Settings" }
                div.field {
                    span.label { "Log Backup" }
                    label.switch {
                        input #log-backup type="checkbox" name="log_backup" value="on" checked[v.log_on];
                        span { "Enabled" }
                    }
                    div.notice.warn.small #log-off-warning {
                        strong { "Important: " } (LOG_OFF_WARNING)
                    }
                }
                div.field {
                    label for="log_retention" { "Log Backup Retention Period (Days)" }
                    input #log_retention name="log_retention" inputmode="numeric" value=(v.log_retention)
                        aria-invalid=[error.filter(|e| error_field(&e.code) == "log_retention").map(|_| "true")];
                    p.hint { "7 to 7300 days, and not more than the data backup retention." }
                    (field_error(error, "log_retention"))
                }
            }
            @if !ro {
                div.formactions {
                    button.primary type="submit" #save-strategy { "Save" }
                    a.button.ghost href=(format!("{}/strategy", base(&inst.id))) { "Cancel" }
                }
                dialog #log-off-dialog aria-labelledby="log-off-title" {
                    h2 #log-off-title { "Turn off log backup?" }
                    p { (LOG_OFF_WARNING) }
                    div.actions {
                        button.ghost type="button" data-close { "Cancel" }
                        button.danger type="submit" name="confirm_log_off" value="yes" { "Turn off log backup" }
                    }
                }
            }
        }
    }
}

/// RDS's warning, shown before log backup is turned off.
const LOG_OFF_WARNING: &str = "Disabling log backup permanently deletes all existing log backup files and removes point-in-time recovery capability.";

// ----- Restore -----

/// API actions the Restore tab needs.
const RESTORE_ACTIONS: [&str; 2] = ["CloneDBInstance", "RestoreTable"];

/// `GET /console/instances/{id}/restore`.
pub async fn restore(
    State(state): State<Arc<ConsoleState>>,
    Path(id): Path<String>,
    page: Page,
) -> Response {
    let inst = match load(&state, &id) {
        Ok(i) => i,
        Err(e) => return missing(&page, e),
    };
    let window = state.service.recovery_window(&inst.id).ok().flatten();
    let sets: Vec<_> = state
        .service
        .engine
        .catalog
        .list_backups(&inst.id)
        .unwrap_or_default()
        .into_iter()
        .rev()
        .filter(|b| b.status == BackupStatus::Success)
        .collect();
    let body = html! {
        div.notice.info #restore-unavailable role="status" {
            strong { "Not available yet in the console. " }
            "Restore through the API, whose actions "
            @for (i, a) in RESTORE_ACTIONS.iter().enumerate() {
                @if i > 0 { " and " }
                code { (a) }
            }
            " do this (official SDK, or "
            code { "scripts/rds-curl.sh CloneDBInstance DBInstanceId=" (inst.id) " BackupId=SET" }
            "), or with "
            code { "strata restore " (inst.id) " --target-dir DIR [--backup SET | --time T] --start" } "."
        }
        div.cards {
            fieldset.card disabled {
                legend { "Clone to a New Instance" }
                div.field {
                    span.label #restore-by { "Restore By" }
                    div.choices role="radiogroup" aria-labelledby="restore-by" {
                        label.check { input type="radio" name="restore_type" value="BackupSet" checked; span { "Backup Set" } }
                        label.check { input type="radio" name="restore_type" value="BackupTime"; span { "Point in Time" } }
                    }
                }
                div.field {
                    label for="clone-set" { "Backup Set" }
                    select #clone-set {
                        @for b in &sets {
                            option value=(b.id) { (b.id) " · " (b.finished_at.map(|f| f.format("%Y-%m-%d %H:%M:%S UTC").to_string()).unwrap_or_default()) }
                        }
                    }
                }
                div.field {
                    label for="clone-time" { "Point in Time" }
                    input #clone-time type="datetime-local" step="1"
                        data-min-utc=[window.map(|w| iso(w.0))] data-max-utc=[window.map(|w| iso(w.1))];
                    p.hint {
                        @match window {
                            Some((from, to)) => { "Within the recoverable window " (time(from)) " – " (time(to)) "." }
                            None => { "No recoverable window: log backup is off or no backup has finished yet." }
                        }
                    }
                }
                div.field {
                    label for="clone-id" { "New Instance ID" }
                    input #clone-id placeholder=(format!("{}-clone", inst.id));
                }
                div.formactions { button.primary type="button" { "Clone Instance" } }
            }
            fieldset.card disabled {
                legend { "Restore Databases to the Original Instance" }
                div.field {
                    label for="db-set" { "Backup Set or Time" }
                    select #db-set {
                        @for b in &sets { option value=(b.id) { (b.id) } }
                    }
                }
                div.field {
                    label for="db-names" { "Databases" }
                    input #db-names placeholder="orders, billing";
                    p.hint { "Each is restored under a new name beside the original." }
                }
                div.formactions { button.primary type="button" { "Restore Databases" } }
            }
        }
    };
    render(&state, page, &inst, Tab::Restore, StatusCode::OK, body)
}

fn iso(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

// ----- Storage -----

/// `GET /console/instances/{id}/storage`.
pub async fn storage(
    State(state): State<Arc<ConsoleState>>,
    Path(id): Path<String>,
    page: Page,
) -> Response {
    let inst = match load(&state, &id) {
        Ok(i) => i,
        Err(e) => return missing(&page, e),
    };
    let body = crate::storage::tab(&state.service, &inst.id, state.service.now());
    render(&state, page, &inst, Tab::Storage, StatusCode::OK, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_land_under_their_fields() {
        assert_eq!(
            error_field("InvalidPreferredBackupPeriod.Malformed"),
            "days"
        );
        assert_eq!(error_field("InvalidParameterCombination"), "log_retention");
        assert_eq!(error_field("Forbidden.ReadOnlyAccessKey"), "");
    }

    #[test]
    fn blank_fields_get_the_services_errors() {
        let mut s = Strategy {
            days: vec![],
            window: "02:00Z-03:00Z".into(),
            retention: "7".into(),
            log_on: true,
            log_retention: "7".into(),
        };
        assert_eq!(
            s.blank_field_error().unwrap().code,
            "InvalidPreferredBackupPeriod.Malformed"
        );
        s.days = vec!["Monday".into(), "Friday".into()];
        assert!(s.blank_field_error().is_none());
        s.retention.clear();
        assert_eq!(
            s.blank_field_error().unwrap().code,
            "InvalidBackupRetentionPeriod.Malformed"
        );
    }

    #[test]
    fn restore_notice_points_at_existing_api_actions() {
        // The notice sends users to these API actions: they must exist.
        // Wiring the tab's forms to them (through `ConsoleState::call`)
        // replaces the notice.
        for a in RESTORE_ACTIONS {
            assert!(strata_api::action_exists(a), "{a} is missing");
        }
    }

    #[test]
    fn windows_offer_every_hour_and_the_current_one() {
        assert_eq!(windows("02:00Z-03:00Z").len(), 24);
        let w = windows("23:30Z-00:30Z");
        assert_eq!((w.len(), w[0].as_str()), (25, "23:30Z-00:30Z"));
        assert_eq!(window_label("02:00Z-03:00Z"), "02:00–03:00 UTC");
    }
}
