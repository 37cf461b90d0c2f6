//! An instance's Backup and Restoration page, with RDS's tabs: Base Backups
//! (data and log backup lists with time filters, paging and download
//! links), Backup Strategy (the policy form), Restore (clone, databases and
//! tables, with the recovery events of [`crate::events`]) and Storage; the
//! Backup Instance button. Cross-Region Backup is [`crate::cross_region`].
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
use strata_catalog::{BackupMethod, BackupPolicy, BackupStatus, Instance};
use strata_service::policy::{self, format_minutes, WEEKDAYS};

use crate::events::{self, EventQuery, EventRestore};
use crate::layout::{self, api_time, badge, bytes, sort_th, state_kind, time, Section};
use crate::session::{Flash, Signed};
use crate::{csrf_ok, csrf_refused, html_response, url_encode, ConsoleState, Fields, Page};

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tab {
    Backups,
    Strategy,
    Restore,
    CrossRegion,
    Storage,
}

const TABS: [(Tab, &str, &str); 5] = [
    (Tab::Backups, "backups", "Base Backups"),
    (Tab::Strategy, "strategy", "Backup Strategy"),
    (Tab::Restore, "restore", "Restore"),
    (Tab::CrossRegion, "cross-region", "Cross-Region Backup"),
    (Tab::Storage, "storage", "Storage"),
];

pub(crate) fn base(id: &str) -> String {
    format!("/console/instances/{}", url_encode(id))
}

/// The instance, or the error for the page saying it does not exist.
pub(crate) fn load(state: &ConsoleState, id: &str) -> Result<Instance, ApiError> {
    Ok(state.service.instance(id)?)
}

pub(crate) fn missing(page: &Page, e: ApiError) -> Response {
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
    let unreachable = strata_api::instance_state(svc, inst)
        .ok()
        .and_then(|s| s.unreachable);
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
                        @if inst.agent_url.is_some() {
                            p { "Start a backup of " strong { (inst.id) } " now?" }
                            div.field role="radiogroup" aria-labelledby="backup-method-label" {
                                span.label #backup-method-label { "Method" }
                                div.choices {
                                    label.check { input type="radio" name="method" value="Physical" checked; span { "Physical (into the repository)" } }
                                    label.check { input type="radio" name="method" value="Snapshot"; span { "Snapshot (copy-on-write, on the database host)" } }
                                }
                            }
                        } @else {
                            p { "Start a full physical backup of " strong { (inst.id) } " now?" }
                        }
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
        @for warning in strata_api::connection_warnings(inst) {
            div.notice.warn role="note" {
                strong { "Connection not verified. " } (warning)
            }
        }
        @if let Some((since, why)) = &unreachable {
            div.notice.err role="alert" {
                strong { "Server unreachable since " (time(*since)) ": " } (why)
                p.muted { "Strata keeps trying to reach it with a growing pause; backups of it fail until it answers again." }
            }
        } @else if let Some(reason) = receiver.strip_prefix("Failing: ") {
            div.notice.err role="alert" {
                strong { "Log backup is failing: " } (reason)
                p.muted { "The WAL receiver retries with a growing pause; WAL the server keeps in its replication slot is stored once the cause is fixed." }
            }
        }
        nav.tabs aria-label="Backup and Restoration" {
            @for (t, path, label) in TABS {
                a href=(format!("{b}/{path}")) aria-current=[(t == tab).then_some("page")] { (label) }
            }
        }
    }
}

pub(crate) fn render(
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
    let form = Fields(form);
    if !csrf_ok(&page.who, &form) {
        return csrf_refused(&page.who);
    }
    let mut params = vec![("DBInstanceId", id.clone())];
    // The API checks the method (and that the instance has an agent for a snapshot).
    let method = form.get("method").trim();
    if !method.is_empty() {
        params.push(("BackupMethod", method.to_string()));
    }
    match state.call(&page.who, "CreateBackup", params).await {
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
        ("DBInstanceId", inst.id.to_string()),
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
    let origin = state.api.links.base_url.as_str();
    let body = html! {
        nav.subtabs aria-label="Backup type" {
            a href=(format!("{b}/backups")) aria-current=[(!log).then_some("page")] { "Data Backup" }
            a href=(format!("{b}/backups?view=log")) aria-current=[log.then_some("page")] { "Log Backup" }
        }
        (filters(&b, &q, log))
        @match &answer {
            Err(e) => { (layout::error_box("The list could not be shown:", e)) }
            Ok(a) if log => { (log_list(a, origin)) (pager(&b, &q, a)) }
            Ok(a) => { (data_list(&b, &page.who, a, origin)) (pager(&b, &q, a)) }
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

fn data_list(base: &str, who: &Signed, answer: &Map<String, Value>, origin: &str) -> Markup {
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
                    (sort_th("Restore Drill", "text"))
                    (sort_th("Kept By", "text"))
                    (sort_th("Expected Expiry", "num"))
                    th scope="col" { "Clone" }
                    th scope="col" { "Download" }
                } }
                tbody {
                    @for b in &rows {
                        @let status = text(b, "BackupStatus");
                        tr data-backup=(text(b, "BackupId")) {
                            td data-v=(text(b, "BackupId")) { code { (text(b, "BackupId")) } }
                            td data-v=(layout::sort_time(layout::parse_api_time(text(b, "BackupStartTime")))) { (api_time(text(b, "BackupStartTime"))) }
                            td data-v=(layout::sort_time(layout::parse_api_time(text(b, "BackupEndTime")))) { (api_time(text(b, "BackupEndTime"))) }
                            td.method data-v=(text(b, "BackupMethod")) {
                                (text(b, "BackupMethod"))
                                @if b.get("StrataSnapshotLocal").and_then(Value::as_bool) == Some(true) {
                                    div.sub { "on the database host" }
                                }
                            }
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
                            (drill_cell(b))
                            (kept_cell(base, who, b))
                            @let expiry = layout::parse_api_time(text(b, "ExpectExpireTime"));
                            td.expiry data-v=(layout::sort_time(expiry)) {
                                @match expiry {
                                    Some(t) => { (time(t)) }
                                    None => { span.muted { "none" } }
                                }
                            }
                            (clone_cell(base, who, b))
                            (download_cell(b, origin))
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

/// Clone of a successful set into a new instance (`CloneDBInstance`, the Restore tab's
/// form): instant on the database host for a snapshot still there.
fn clone_cell(base: &str, who: &Signed, set: &Value) -> Markup {
    let local = set.get("StrataSnapshotLocal").and_then(Value::as_bool) == Some(true);
    let hint = if local {
        "A new instance from this snapshot, cloned on the database host by its agent"
    } else {
        "A new instance restored from this set on this host"
    };
    html! {
        td.clone {
            @if !who.read_only && text(set, "BackupStatus") == BackupStatus::Success.as_str() {
                form method="post" action=(format!("{base}/restore/clone")) {
                    (layout::csrf(who))
                    input type="hidden" name="restore_by" value="BackupSet";
                    input type="hidden" name="backup_id" value=(text(set, "BackupId"));
                    button.ghost type="submit" title=(hint) { "Clone" }
                }
            } @else {
                span.muted { "—" }
            }
        }
    }
}

/// A signed download link of an answer, relative when it points at this
/// server: the browser then fetches it from the address it reached the
/// console at (the listen address in the link may be `0.0.0.0`).
fn download_link<'a>(item: &'a Value, key: &str, origin: &str) -> Option<&'a str> {
    let link = item
        .get(key)
        .and_then(Value::as_str)
        .filter(|l| !l.is_empty())?;
    Some(match link.strip_prefix(origin) {
        Some(path) if path.starts_with("/download/") => path,
        _ => link,
    })
}

/// The set's signed download links as `DescribeBackups` gives them (a tar
/// in `pg_basebackup -Ft` layout, or the same zstd-compressed); sets that
/// have none (not successful, or a snapshot not uploaded yet) show a dash.
fn download_cell(set: &Value, origin: &str) -> Markup {
    let link = |key: &str| download_link(set, key, origin);
    html! {
        td.download {
            @match link("BackupDownloadURL") {
                Some(tar) => {
                    a.dl href=(tar) download title="The set as one tar in pg_basebackup's layout (base.tar, pg_wal.tar, backup_manifest); the link expires after a while: reload the list for a fresh one" { "Download" }
                    @if let Some(zst) = link("StrataBackupDownloadURLZstd") {
                        div.sub { a.dlzst href=(zst) download { ".tar.zst" } }
                    }
                }
                None => { span.muted title="Only a successful set in the repository downloads" { "—" } }
            }
        }
    }
}

/// What keeps a set (retention's words), its keep by hand with Release,
/// or Keep with an optional date and note.
fn kept_cell(base: &str, who: &Signed, set: &Value) -> Markup {
    let id = text(set, "BackupId");
    let until = text(set, "StrataKeepUntil");
    let action = format!("{base}/backups/keep");
    html! {
        td.kept data-v=(text(set, "StrataKeptBy")) {
            span.keptby { (text(set, "StrataKeptBy")) }
            @if !until.is_empty() {
                div.sub.keep {
                    @match layout::parse_api_time(until) {
                        Some(t) => { "until " (time(t)) }
                        None => { (until) }
                    }
                    @let note = text(set, "StrataKeepNote");
                    @if !note.is_empty() { " · " (note) }
                }
            }
            @if !who.read_only && text(set, "BackupStatus") == BackupStatus::Success.as_str() {
                @if until.is_empty() {
                    details.keepform {
                        summary.button.ghost { "Keep" }
                        form method="post" action=(action) {
                            (layout::csrf(who))
                            input type="hidden" name="backup_id" value=(id);
                            label { "Until" input type="date" name="until" aria-label="Keep until"; }
                            label { "Note" input name="note" maxlength="256" aria-label="Note"; }
                            p.hint { "No date: kept until released." }
                            button.primary type="submit" name="op" value="keep" { "Keep" }
                        }
                    }
                } @else {
                    form method="post" action=(action) {
                        (layout::csrf(who))
                        input type="hidden" name="backup_id" value=(id);
                        button.ghost type="submit" name="op" value="release" { "Release" }
                    }
                }
            }
        }
    }
}

/// `KeepUntil` for a date picked in the form: the start of that day, UTC;
/// no date keeps the set until released.
fn keep_until(date: &str) -> String {
    match date.trim() {
        "" => "forever".to_string(),
        d if d.len() == 10 => format!("{d}T00:00:00Z"),
        d => d.to_string(),
    }
}

/// `POST /console/instances/{id}/backups/keep`: `StrataKeepBackup` or
/// `StrataReleaseBackup` of one set.
pub async fn keep_backup(
    State(state): State<Arc<ConsoleState>>,
    Path(id): Path<String>,
    page: Page,
    Form(form): Form<Vec<(String, String)>>,
) -> Response {
    let form = Fields(form);
    if !csrf_ok(&page.who, &form) {
        return csrf_refused(&page.who);
    }
    let set = form.get("backup_id").trim().to_string();
    let mut params = vec![("DBInstanceId", id.clone()), ("BackupId", set.clone())];
    let (action, done, failed) = if form.get("op") == "release" {
        (
            "StrataReleaseBackup",
            "released",
            "The set was not released:",
        )
    } else {
        params.push(("KeepUntil", keep_until(form.get("until"))));
        params.push(("Note", form.get("note").trim().to_string()));
        ("StrataKeepBackup", "kept", "The set was not kept:")
    };
    match state.call(&page.who, action, params).await {
        Ok(_) => state.flash(
            &page.who,
            Flash::Done {
                text: format!("Backup set {set} {done}."),
                link: None,
            },
        ),
        Err(e) => state.flash_error(&page.who, failed, &e),
    }
    Redirect::to(&format!("{}/backups", base(&id))).into_response()
}

/// The last restore drill of a set: its result, with when it ran and what
/// it found on hover.
fn drill_cell(set: &Value) -> Markup {
    let status = text(set, "StrataDrillStatus");
    let at = layout::parse_api_time(text(set, "StrataDrillTime"));
    let hover = match (at, text(set, "StrataDrillMessage")) {
        (Some(t), "") => format!("{}", t.format("%Y-%m-%d %H:%M:%S UTC")),
        (Some(t), m) => format!("{} · {m}", t.format("%Y-%m-%d %H:%M:%S UTC")),
        (None, m) => m.to_string(),
    };
    let (kind, label) = match status {
        "" => {
            return html! { td.drill data-v="" { span.muted title="This set has not been drilled" { "None" } } }
        }
        "Passed" => ("ok", "Passed"),
        "Failed" => ("err", "Failed"),
        "Skipped" => ("neutral", "Skipped"),
        other => ("info", other),
    };
    html! {
        td.drill data-v=(status) {
            span class=(format!("badge {kind}")) title=(hover) data-utc=[at.map(iso)] { (label) }
        }
    }
}

fn log_list(answer: &Map<String, Value>, origin: &str) -> Markup {
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
                            td.download {
                                @match download_link(w, "DownloadLink", origin) {
                                    Some(link) => { a href=(link) download title=(format!("The segment's original bytes; the link expires {}", text(w, "LinkExpiredTime"))) { "Download" } }
                                    None => { span.muted { "—" } }
                                }
                            }
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
    /// High-frequency snapshot interval in minutes, `-1` off.
    interval: String,
    advanced_on: bool,
    archive_days: String,
    archive_policy: String,
    archive_count: String,
    /// Last N sets kept whatever their age, `0` off.
    keep_last: String,
}

impl Strategy {
    fn of(p: &BackupPolicy) -> Strategy {
        Strategy {
            days: p.backup_days.clone(),
            window: p.backup_window.clone(),
            retention: p.backup_retention_days.to_string(),
            log_on: p.log_backup_enabled,
            log_retention: p.log_retention_days.to_string(),
            interval: p
                .backup_interval_minutes
                .map_or("-1".to_string(), |m| m.to_string()),
            advanced_on: p.advanced_enabled,
            archive_days: p.archive_retention_days.to_string(),
            archive_policy: p.archive_keep_policy.as_str().to_string(),
            archive_count: p.archive_keep_count.to_string(),
            keep_last: p.keep_last.unwrap_or(0).to_string(),
        }
    }

    fn from_form(f: &Fields) -> Strategy {
        Strategy {
            days: f.all("day").into_iter().map(str::to_string).collect(),
            window: f.get("window").to_string(),
            retention: f.get("retention").trim().to_string(),
            log_on: f.get("log_backup") == "on",
            log_retention: f.get("log_retention").trim().to_string(),
            interval: f.get("interval").trim().to_string(),
            advanced_on: f.get("advanced") == "on",
            archive_days: zero_if_blank(f.get("archive_days")),
            archive_policy: f.get("archive_policy").trim().to_string(),
            archive_count: f.get("archive_count").trim().to_string(),
            keep_last: zero_if_blank(f.get("keep_last")),
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
            ("BackupInterval", self.interval.clone()),
            (
                "EnableAdvancedBackupPolicy",
                if self.advanced_on { "1" } else { "0" }.into(),
            ),
            ("ArchiveBackupRetentionPeriod", self.archive_days.clone()),
            ("ArchiveBackupKeepPolicy", self.archive_policy.clone()),
            ("ArchiveBackupKeepCount", self.archive_count.clone()),
            ("StrataKeepLastBackups", self.keep_last.clone()),
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
                policy::Refusal::DataRetentionMalformed,
                "BackupRetentionPeriod",
            )
            .err()
            .map(ApiError::from);
        }
        if self.log_retention.is_empty() {
            return policy::parse_days_count(
                "",
                policy::Refusal::LogRetentionMalformed,
                "LogBackupRetentionPeriod",
            )
            .err()
            .map(ApiError::from);
        }
        None
    }
}

/// An option whose empty field means off (`0`), as its hint says.
fn zero_if_blank(v: &str) -> String {
    match v.trim() {
        "" => "0".to_string(),
        v => v.to_string(),
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
        "InvalidBackupInterval.Malformed" | "InvalidBackupInterval.NotSupported" => "interval",
        "InvalidArchiveBackupPolicy.Malformed" => "archive",
        "InvalidKeepLast.Malformed" => "keep_last",
        "InvalidAdvancedDataPolicies.Malformed" | "InvalidEnableAdvancedBackupPolicy.Malformed" => {
            "rules"
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
        Ok(p) => strategy_form(
            &state,
            &page.who,
            &inst,
            &p,
            &Strategy::of(&p),
            None,
            false,
            None,
        ),
        Err(e) => layout::error_box("The policy could not be read:", &e.into()),
    };
    render(&state, page, &inst, Tab::Strategy, StatusCode::OK, body)
}

/// What a Backup Strategy form acts on: the instance and its current policy,
/// once the form's CSRF token is checked; otherwise the page saying why not.
fn strategy_target(
    state: &ConsoleState,
    id: &str,
    page: Page,
    form: &Fields,
) -> Result<(Page, Instance, strata_catalog::BackupPolicy), Box<Response>> {
    if !csrf_ok(&page.who, form) {
        return Err(Box::new(csrf_refused(&page.who)));
    }
    let inst = load(state, id).map_err(|e| Box::new(missing(&page, e)))?;
    match state.service.policy(&inst.id) {
        Ok(p) => Ok((page, inst, p)),
        Err(e) => {
            let body = layout::error_box("The policy could not be read:", &e.into());
            Err(Box::new(render(
                state,
                page,
                &inst,
                Tab::Strategy,
                StatusCode::INTERNAL_SERVER_ERROR,
                body,
            )))
        }
    }
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
    let (page, inst, current) = match strategy_target(&state, &id, page, &form) {
        Ok(t) => t,
        Err(refused) => return *refused,
    };
    let values = Strategy::from_form(&form);
    let turning_off = current.log_backup_enabled && !values.log_on;
    if turning_off && !page.who.read_only && form.get("confirm_log_off") != "yes" {
        let body = strategy_form(
            &state, &page.who, &inst, &current, &values, None, true, None,
        );
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
            let body = strategy_form(
                &state,
                &page.who,
                &inst,
                &current,
                &values,
                Some(&e),
                false,
                None,
            );
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
    rule_edit: Option<&RuleEdit>,
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
            (retention_fieldset(v, error, ro))
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
        (rules_table(inst, who, stored, rule_edit))
    }
}

/// The high-frequency intervals offered, in minutes (`-1`: off).
const INTERVALS: [(&str, &str); 10] = [
    ("-1", "Off"),
    ("15", "15 minutes"),
    ("30", "30 minutes"),
    ("60", "1 hour"),
    ("120", "2 hours"),
    ("180", "3 hours"),
    ("240", "4 hours"),
    ("360", "6 hours"),
    ("480", "8 hours"),
    ("720", "12 hours"),
];

const ARCHIVE_POLICIES: [(&str, &str); 3] = [
    ("ByMonth", "First sets of each month"),
    ("ByWeek", "First sets of each week"),
    ("KeepAll", "Every set"),
];

fn invalid(error: Option<&ApiError>, field: &str) -> Option<&'static str> {
    error
        .filter(|e| error_field(&e.code) == field)
        .map(|_| "true")
}

/// The retention options beyond the regular days: high-frequency
/// snapshots, keep last N, archived sets and the advanced rules' switch.
fn retention_fieldset(v: &Strategy, error: Option<&ApiError>, ro: bool) -> Markup {
    html! {
        fieldset.card disabled[ro] {
            legend { "Retention Rules" }
            div.field {
                label for="interval" { "High-Frequency Snapshots" }
                select #interval name="interval" aria-invalid=[invalid(error, "interval")] {
                    @if !INTERVALS.iter().any(|(m, _)| *m == v.interval) {
                        option value=(v.interval) selected { (v.interval) " minutes" }
                    }
                    @for (minutes, label) in INTERVALS {
                        option value=(minutes) selected[minutes == v.interval] { (label) }
                    }
                }
                p.hint { "Snapshots this often on backup days, thinned to hourly over a day and daily after. Only with snapshot backups (Flash)." }
                (field_error(error, "interval"))
            }
            div.field {
                label for="keep_last" { "Keep Last Backup Sets" }
                input #keep_last name="keep_last" inputmode="numeric" value=(v.keep_last)
                    aria-invalid=[invalid(error, "keep_last")];
                p.hint { "The last 1 to 1000 successful sets stay whatever their age; 0: off." }
                (field_error(error, "keep_last"))
            }
            div.field role="group" aria-labelledby="archive-label" {
                span.label #archive-label { "Archived Backups" }
                div.inline {
                    label for="archive_days" { "Retention (Days)" }
                    input #archive_days name="archive_days" inputmode="numeric" value=(v.archive_days)
                        aria-invalid=[invalid(error, "archive")];
                    label for="archive_policy" { "Keep" }
                    select #archive_policy name="archive_policy" {
                        @for (value, label) in ARCHIVE_POLICIES {
                            option value=(value) selected[value == v.archive_policy] { (label) }
                        }
                    }
                    label for="archive_count" { "Sets per Period" }
                    input #archive_count name="archive_count" inputmode="numeric" value=(v.archive_count)
                        aria-invalid=[invalid(error, "archive")];
                }
                p.hint { "30 to 1095 days past their end (0: off); 1 to 31 sets a month or 1 to 7 a week." }
                (field_error(error, "archive"))
            }
            div.field {
                span.label { "Advanced Backup Policy" }
                label.switch {
                    input #advanced type="checkbox" name="advanced" value="on" checked[v.advanced_on];
                    span { "Enabled" }
                }
                p.hint { "Turns on the rules below beside the regular one." }
            }
        }
    }
}

/// A rule of the advanced policy as the rules table edits it.
#[derive(Debug, Clone, Default)]
struct RuleDraft {
    /// `StrategyId`; empty for a rule being added.
    id: String,
    kind: String,
    value: String,
    retention: String,
}

impl RuleDraft {
    fn from_form(f: &Fields) -> RuleDraft {
        RuleDraft {
            id: f.get("rule").trim().to_string(),
            kind: f.get("kind").trim().to_string(),
            value: f.get("value").trim().to_string(),
            retention: f.get("retention").trim().to_string(),
        }
    }
}

/// A refused rule change, shown with what was entered.
struct RuleEdit {
    error: ApiError,
    draft: RuleDraft,
}

/// Which edit a rule form asks for: `ActionType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RuleOp {
    Create,
    Update,
    Delete,
}

impl RuleOp {
    fn parse(s: &str) -> Option<RuleOp> {
        match s {
            "create" => Some(RuleOp::Create),
            "update" => Some(RuleOp::Update),
            "delete" => Some(RuleOp::Delete),
            _ => None,
        }
    }

    fn action_type(self) -> &'static str {
        match self {
            RuleOp::Create => "CREATE",
            RuleOp::Update => "UPDATE",
            RuleOp::Delete => "DELETE",
        }
    }

    fn done(self) -> &'static str {
        match self {
            RuleOp::Create => "added",
            RuleOp::Update => "saved",
            RuleOp::Delete => "deleted",
        }
    }
}

const RULE_KINDS: [&str; 3] = ["Weekly", "Monthly", "Yearly"];

/// An id for a new rule of `kind`: `monthly-1`, or the next number free.
fn new_rule_id(kind: &str, stored: &BackupPolicy) -> String {
    let stem = kind.to_ascii_lowercase();
    (1..)
        .map(|n| format!("{stem}-{n}"))
        .find(|id| !stored.advanced_data_rules.iter().any(|r| &r.id == id))
        .unwrap_or(stem)
}

/// `ModifyBackupPolicy`'s parameters for one rule edit (`ActionType` mode).
fn rule_params(
    instance_id: &str,
    op: RuleOp,
    draft: &RuleDraft,
    stored: &BackupPolicy,
) -> Vec<(&'static str, String)> {
    let id = if op == RuleOp::Create {
        new_rule_id(&draft.kind, stored)
    } else {
        draft.id.clone()
    };
    let mut params = vec![
        ("DBInstanceId", instance_id.to_string()),
        ("AdvancedDataPolicies.1.ActionType", op.action_type().into()),
        ("AdvancedDataPolicies.1.StrategyId", id),
    ];
    if op != RuleOp::Delete {
        params.extend([
            ("AdvancedDataPolicies.1.FilterType", draft.kind.clone()),
            ("AdvancedDataPolicies.1.FilterValue", draft.value.clone()),
            ("AdvancedDataPolicies.1.RetentionType", "Days".into()),
            (
                "AdvancedDataPolicies.1.RetentionValue",
                draft.retention.clone(),
            ),
        ]);
    }
    params
}

/// One editable row of the rules table: its inputs belong to the form in
/// its last cell (`form` attribute), as a form cannot span cells.
fn rule_row(inst: &Instance, who: &Signed, draft: &RuleDraft, ro: bool) -> Markup {
    let adding = draft.id.is_empty();
    let form_id = if adding {
        "rule-new".to_string()
    } else {
        format!("rule-{}", draft.id)
    };
    html! {
        tr data-rule=(if adding { "new" } else { draft.id.as_str() }) {
            td {
                @if adding { span.muted { "new rule" } } @else { code { (draft.id) } }
            }
            td {
                select name="kind" form=(form_id) aria-label="Kind" disabled[ro] {
                    @for k in RULE_KINDS {
                        option value=(k) selected[k == draft.kind] { (k) }
                    }
                }
            }
            td { input name="value" form=(form_id) value=(draft.value) aria-label="Days" disabled[ro]
                placeholder="Monday,Friday · 1,15,Last · 12-31"; }
            td { input name="retention" form=(form_id) inputmode="numeric" value=(draft.retention)
                aria-label="Retention (days)" disabled[ro]; }
            td.ruleactions {
                @if !ro {
                    form id=(form_id) method="post" action=(format!("{}/strategy/rules", base(&inst.id))) {
                        (layout::csrf(who))
                        input type="hidden" name="rule" value=(draft.id);
                        @if adding {
                            button.primary type="submit" name="op" value="create" { "Add" }
                        } @else {
                            button.ghost type="submit" name="op" value="update" { "Save" }
                            button.danger type="submit" name="op" value="delete" { "Delete" }
                        }
                    }
                }
            }
        }
    }
}

/// The advanced policy's rules: the regular one first (edited with the
/// form above, never deleted), then the others, and a row to add one.
fn rules_table(
    inst: &Instance,
    who: &Signed,
    stored: &BackupPolicy,
    edit: Option<&RuleEdit>,
) -> Markup {
    let ro = who.read_only;
    let draft_for = |id: &str| edit.map(|e| &e.draft).filter(|d| d.id == id);
    let added = draft_for("").cloned().unwrap_or_else(|| RuleDraft {
        kind: "Monthly".into(),
        ..RuleDraft::default()
    });
    html! {
        section.card #advanced-rules aria-labelledby="rules-title" {
            h2 #rules-title { "Advanced Backup Rules" }
            p.hint {
                "A set is kept for the longest retention among the rules falling on its day. "
                "The rules apply while the advanced policy is enabled above."
            }
            @if let Some(e) = edit {
                p.fielderror role="alert" #rules-error { "The rule was not saved: " (e.error.message) " " span.code { (e.error.code) } }
            }
            div.tablewrap {
                table.data #rules {
                    thead { tr {
                        th scope="col" { "Rule" }
                        th scope="col" { "Kind" }
                        th scope="col" { "Days" }
                        th scope="col" { "Retention (Days)" }
                        th scope="col" { "Actions" }
                    } }
                    tbody {
                        tr data-rule="regular" {
                            td { code { "regular" } }
                            td { "Weekly" }
                            td { (stored.backup_days.join(",")) }
                            td { (stored.backup_retention_days) }
                            td { span.muted { "the backup cycle and retention above" } }
                        }
                        @for r in &stored.advanced_data_rules {
                            @let (kind, value) = policy::rule_filter(&r.kind);
                            @let draft = draft_for(&r.id).cloned().unwrap_or_else(|| RuleDraft {
                                id: r.id.clone(),
                                kind: kind.to_string(),
                                value,
                                retention: r.retention_days.to_string(),
                            });
                            (rule_row(inst, who, &draft, ro))
                        }
                        @if !ro {
                            (rule_row(inst, who, &added, ro))
                        }
                    }
                }
            }
        }
    }
}

/// `POST /console/instances/{id}/strategy/rules`: one rule added, saved or
/// deleted through `ModifyBackupPolicy`'s `ActionType` edits.
pub async fn save_rule(
    State(state): State<Arc<ConsoleState>>,
    Path(id): Path<String>,
    page: Page,
    Form(form): Form<Vec<(String, String)>>,
) -> Response {
    let form = Fields(form);
    let (page, inst, current) = match strategy_target(&state, &id, page, &form) {
        Ok(t) => t,
        Err(refused) => return *refused,
    };
    let draft = RuleDraft::from_form(&form);
    let Some(op) = RuleOp::parse(form.get("op")) else {
        // Not one of the table's buttons: nothing to change.
        return Redirect::to(&format!("{}/strategy", base(&inst.id))).into_response();
    };
    let outcome = state
        .call(
            &page.who,
            "ModifyBackupPolicy",
            rule_params(&inst.id, op, &draft, &current),
        )
        .await;
    match outcome.map(|_| op) {
        Ok(op) => {
            state.flash(
                &page.who,
                Flash::Done {
                    text: format!("Backup rule {}.", op.done()),
                    link: None,
                },
            );
            Redirect::to(&format!("{}/strategy", base(&inst.id))).into_response()
        }
        Err(error) => {
            let status = error.status;
            let edit = RuleEdit { error, draft };
            let body = strategy_form(
                &state,
                &page.who,
                &inst,
                &current,
                &Strategy::of(&current),
                None,
                false,
                Some(&edit),
            );
            render(&state, page, &inst, Tab::Strategy, status, body)
        }
    }
}

/// RDS's warning, shown before log backup is turned off.
const LOG_OFF_WARNING: &str = "Disabling log backup permanently deletes all existing log backup files and removes point-in-time recovery capability.";

// ----- Restore -----

/// Which of the Restore tab's forms was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RestoreKind {
    /// `CloneDBInstance`: a new instance from a backup set or a time.
    Clone,
    /// `RestoreTable` with databases: copies beside the originals.
    Databases,
    /// `RestoreTable` with tables of one database: copies beside the
    /// originals in that database.
    Tables,
}

impl RestoreKind {
    /// Prefix of the form's element ids.
    fn prefix(self) -> &'static str {
        match self {
            RestoreKind::Clone => "clone",
            RestoreKind::Databases => "db",
            RestoreKind::Tables => "tbl",
        }
    }
}

/// Database rows the Restore Databases form offers.
const DATABASE_ROWS: usize = 3;

/// A Restore tab form's values, as submitted (or blank).
#[derive(Debug, Clone, Default)]
struct RestoreForm {
    by_time: bool,
    backup_id: String,
    /// UTC, `yyyy-MM-ddTHH:mm:ssZ`, as the script fills it from the local picker.
    restore_time: String,
    /// (database, restored as) pairs; blank rows are left out.
    databases: Vec<(String, String)>,
    /// The database the Tables form restores tables of, into itself.
    database: String,
    /// (table, restored as) pairs; blank rows are left out.
    tables: Vec<(String, String)>,
}

/// `name`/`newname` pairs of repeated form fields, blank rows left out.
fn name_pairs(f: &Fields, name: &str, newname: &str) -> Vec<(String, String)> {
    let names = f.all(name);
    let new_names = f.all(newname);
    names
        .iter()
        .zip(new_names.iter().chain(std::iter::repeat(&"")))
        .map(|(n, m)| (n.trim().to_string(), m.trim().to_string()))
        .filter(|(n, m)| !n.is_empty() || !m.is_empty())
        .collect()
}

impl RestoreForm {
    fn from_form(f: &Fields) -> RestoreForm {
        RestoreForm {
            by_time: f.get("restore_by") == "BackupTime",
            backup_id: f.get("backup_id").trim().to_string(),
            restore_time: f.get("restore_time").trim().to_string(),
            databases: name_pairs(f, "db_name", "db_newname"),
            database: f.get("tbl_db").trim().to_string(),
            tables: name_pairs(f, "table_name", "table_newname"),
        }
    }

    /// `BackupId` or `RestoreTime`, whichever the form restores by; an
    /// empty choice is left to the API to refuse.
    fn source_params(&self, instance_id: &str) -> Vec<(&'static str, String)> {
        let source = if self.by_time {
            ("RestoreTime", self.restore_time.clone())
        } else {
            ("BackupId", self.backup_id.clone())
        };
        vec![("DBInstanceId", instance_id.to_string()), source]
    }

    /// `RestoreTable`'s `TableMeta` for the chosen databases.
    fn table_meta(&self) -> String {
        let entries: Vec<Value> = self
            .databases
            .iter()
            .map(|(name, new)| serde_json::json!({"type": "db", "name": name, "newname": new}))
            .collect();
        Value::Array(entries).to_string()
    }

    /// `RestoreTable`'s `TableMeta` for the chosen tables of one database,
    /// restored into that database.
    fn tables_meta(&self) -> String {
        let tables: Vec<Value> = self
            .tables
            .iter()
            .map(|(name, new)| serde_json::json!({"type": "table", "name": name, "newname": new}))
            .collect();
        serde_json::json!([{"type": "db", "name": self.database, "tables": tables}]).to_string()
    }
}

/// Which field of a Restore tab form an API error belongs under.
fn restore_error_field(code: &str, by_time: bool) -> &'static str {
    match code {
        "InvalidRestoreTime"
        | "InvalidRestoreTime.Format"
        | "InvalidRestoreTime.NoLogBackup"
        | "InvalidParameterCombination" => "time",
        "InvalidBackupSetID.NotFound" => "set",
        "MissingParameter" if by_time => "time",
        "MissingParameter" => "set",
        c if c.starts_with("InvalidTableMeta")
            || c.starts_with("InvalidDBName")
            || c.starts_with("InvalidTableName") =>
        {
            "databases"
        }
        _ => "",
    }
}

/// What the Restore tab shows: each form's values and the error of the one
/// that was sent.
#[derive(Default)]
struct RestoreView {
    clone: RestoreForm,
    databases: RestoreForm,
    tables: RestoreForm,
    error: Option<(RestoreKind, ApiError)>,
    /// The databases of the set the Databases form restores from.
    choices: Option<SetChoices>,
}

/// The databases a backup set holds (`DescribeBackupDatabase`), offered
/// in the Databases form, or why the set has no list.
#[derive(Debug, Clone)]
struct SetChoices {
    backup_id: String,
    databases: Result<Vec<String>, String>,
}

impl SetChoices {
    /// Asks the API as the signed-in key.
    async fn read(
        state: &ConsoleState,
        who: &Signed,
        instance_id: &str,
        backup_id: &str,
    ) -> SetChoices {
        let params = vec![
            ("DBInstanceId", instance_id.to_string()),
            ("BackupId", backup_id.to_string()),
        ];
        let databases = match state.call(who, "DescribeBackupDatabase", params).await {
            Ok(answer) => Ok(answer
                .get("StrataDatabaseNames")
                .and_then(Value::as_array)
                .map(|names| {
                    names
                        .iter()
                        .filter_map(Value::as_str)
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default()),
            Err(e) => Err(e.message),
        };
        SetChoices {
            backup_id: backup_id.to_string(),
            databases,
        }
    }

    /// The set the form restores from: the one chosen, else the newest
    /// successful one (the list's first option).
    async fn for_form(
        state: &ConsoleState,
        who: &Signed,
        inst: &Instance,
        form: &RestoreForm,
    ) -> Option<SetChoices> {
        let chosen = match form.backup_id.as_str() {
            "" => state
                .service
                .backup_sets(&inst.id)
                .ok()?
                .into_iter()
                .rev()
                .find(|b| b.status == BackupStatus::Success)?
                .id
                .to_string(),
            id => id.to_string(),
        };
        Some(SetChoices::read(state, who, &inst.id, &chosen).await)
    }

    /// As the page's script receives it when another set is chosen.
    fn json(&self) -> Value {
        match &self.databases {
            Ok(names) => serde_json::json!({"BackupId": self.backup_id, "Databases": names}),
            Err(why) => serde_json::json!({"BackupId": self.backup_id, "Error": why}),
        }
    }
}

/// `GET /console/instances/{id}/restore/databases?backup_id=…`: the
/// databases of one set as JSON, for the Databases form's suggestions.
pub async fn set_databases(
    State(state): State<Arc<ConsoleState>>,
    Path(id): Path<String>,
    page: Page,
    Query(q): Query<SetQuery>,
) -> Response {
    let inst = match load(&state, &id) {
        Ok(i) => i,
        Err(e) => return missing(&page, e),
    };
    let choices = SetChoices::read(&state, &page.who, &inst.id, &q.backup_id).await;
    axum::Json(choices.json()).into_response()
}

/// The query of [`set_databases`].
#[derive(Debug, Deserialize)]
pub struct SetQuery {
    #[serde(default)]
    backup_id: String,
}

impl RestoreView {
    fn form(&self, kind: RestoreKind) -> &RestoreForm {
        match kind {
            RestoreKind::Clone => &self.clone,
            RestoreKind::Databases => &self.databases,
            RestoreKind::Tables => &self.tables,
        }
    }

    fn error(&self, kind: RestoreKind) -> Option<&ApiError> {
        self.error
            .as_ref()
            .filter(|(k, _)| *k == kind)
            .map(|(_, e)| e)
    }
}

/// `GET /console/instances/{id}/restore`.
pub async fn restore(
    State(state): State<Arc<ConsoleState>>,
    Path(id): Path<String>,
    page: Page,
    Query(q): Query<EventQuery>,
) -> Response {
    let inst = match load(&state, &id) {
        Ok(i) => i,
        Err(e) => return missing(&page, e),
    };
    let events = events::section(&state, &page.who, &inst, &q, None).await;
    let mut view = RestoreView::default();
    view.choices = SetChoices::for_form(&state, &page.who, &inst, &view.databases).await;
    let body = restore_body(&state, &page.who, &inst, &view, events);
    render(&state, page, &inst, Tab::Restore, StatusCode::OK, body)
}

/// `POST /console/instances/{id}/restore/clone`: `CloneDBInstance`.
pub async fn clone_instance(
    State(state): State<Arc<ConsoleState>>,
    Path(id): Path<String>,
    page: Page,
    Form(form): Form<Vec<(String, String)>>,
) -> Response {
    submit_restore(state, id, page, Fields(form), RestoreKind::Clone).await
}

/// `POST /console/instances/{id}/restore/databases`: `RestoreTable`.
pub async fn restore_databases(
    State(state): State<Arc<ConsoleState>>,
    Path(id): Path<String>,
    page: Page,
    Form(form): Form<Vec<(String, String)>>,
) -> Response {
    submit_restore(state, id, page, Fields(form), RestoreKind::Databases).await
}

/// `POST /console/instances/{id}/restore/tables`: `RestoreTable` of
/// single tables, under new names in their own database.
pub async fn restore_tables(
    State(state): State<Arc<ConsoleState>>,
    Path(id): Path<String>,
    page: Page,
    Form(form): Form<Vec<(String, String)>>,
) -> Response {
    submit_restore(state, id, page, Fields(form), RestoreKind::Tables).await
}

/// Runs the form's action as the signed-in key; on success the Task
/// Center, else the tab again with the values kept and the error under its
/// field.
async fn submit_restore(
    state: Arc<ConsoleState>,
    id: String,
    page: Page,
    form: Fields,
    kind: RestoreKind,
) -> Response {
    let inst = match restore_request(&state, &id, &page, &form) {
        Ok(i) => i,
        Err(refused) => return *refused,
    };
    let values = RestoreForm::from_form(&form);
    let mut params = values.source_params(&inst.id);
    let action = match kind {
        RestoreKind::Clone => "CloneDBInstance",
        RestoreKind::Databases => {
            params.push(("TableMeta", values.table_meta()));
            "RestoreTable"
        }
        RestoreKind::Tables => {
            params.push(("TableMeta", values.tables_meta()));
            "RestoreTable"
        }
    };
    match state.call(&page.who, action, params).await {
        Ok(answer) => {
            let done = match kind {
                RestoreKind::Clone => {
                    let new_id = answer
                        .get("DBInstanceId")
                        .and_then(Value::as_str)
                        .unwrap_or_default();
                    Flash::Done {
                        text: format!(
                            "New instance {new_id} is being created from {}; it is listed as Running once its restore finishes.",
                            inst.id
                        ),
                        link: Some((crate::HOME.into(), "See it in the Instances list".into())),
                    }
                }
                RestoreKind::Databases | RestoreKind::Tables => {
                    let job = answer
                        .get("StrataJobId")
                        .and_then(Value::as_str)
                        .unwrap_or_default();
                    let list: Vec<String> = match kind {
                        RestoreKind::Tables => values
                            .tables
                            .iter()
                            .map(|(n, m)| format!("{}.{n} as {m}", values.database))
                            .collect(),
                        _ => values
                            .databases
                            .iter()
                            .map(|(n, m)| format!("{n} as {m}"))
                            .collect(),
                    };
                    Flash::Done {
                        text: format!(
                            "Restore task {job} started: {} into {}.",
                            list.join(", "),
                            inst.id
                        ),
                        link: None,
                    }
                }
            };
            state.flash(&page.who, done);
            Redirect::to(&format!("/console/tasks?instance={}", url_encode(&inst.id)))
                .into_response()
        }
        Err(e) => {
            let status = e.status;
            let mut view = RestoreView::default();
            match kind {
                RestoreKind::Clone => view.clone = values,
                RestoreKind::Databases => view.databases = values,
                RestoreKind::Tables => view.tables = values,
            }
            view.error = Some((kind, e));
            view.choices = SetChoices::for_form(&state, &page.who, &inst, &view.databases).await;
            let events =
                events::section(&state, &page.who, &inst, &EventQuery::default(), None).await;
            let body = restore_body(&state, &page.who, &inst, &view, events);
            render(&state, page, &inst, Tab::Restore, status, body)
        }
    }
}

/// The instance a Restore tab form was sent for: the one check every
/// restore form goes through (the session's token, then the instance).
fn restore_request(
    state: &ConsoleState,
    id: &str,
    page: &Page,
    form: &Fields,
) -> Result<Instance, Box<Response>> {
    if !csrf_ok(&page.who, form) {
        return Err(Box::new(csrf_refused(&page.who)));
    }
    load(state, id).map_err(|e| Box::new(missing(page, e)))
}

/// `POST /console/instances/{id}/restore/event`: a restore to just before
/// a recovery event's transaction (`RestoreTable` or `CloneDBInstance`); on
/// success the Task Center, else the tab with the service's answer above
/// the events.
pub async fn restore_event(
    State(state): State<Arc<ConsoleState>>,
    Path(id): Path<String>,
    page: Page,
    Form(form): Form<Vec<(String, String)>>,
) -> Response {
    let form = Fields(form);
    let inst = match restore_request(&state, &id, &page, &form) {
        Ok(i) => i,
        Err(refused) => return *refused,
    };
    let answer = match EventRestore::from_form(&form) {
        Ok(restore) => {
            let (action, params) = restore.call(&inst.id);
            state
                .call(&page.who, action, params)
                .await
                .map(|answer| (restore, answer))
        }
        Err(e) => Err(e),
    };
    match answer {
        Ok((restore, answer)) => {
            let link = matches!(restore, EventRestore::Clone { .. })
                .then(|| (crate::HOME.into(), "See it in the Instances list".into()));
            state.flash(
                &page.who,
                Flash::Done {
                    text: restore.started(&inst.id, &answer),
                    link,
                },
            );
            Redirect::to(&format!("/console/tasks?instance={}", url_encode(&inst.id)))
                .into_response()
        }
        Err(e) => {
            let events =
                events::section(&state, &page.who, &inst, &EventQuery::default(), Some(&e)).await;
            let mut view = RestoreView::default();
            view.choices = SetChoices::for_form(&state, &page.who, &inst, &view.databases).await;
            let body = restore_body(&state, &page.who, &inst, &view, events);
            render(&state, page, &inst, Tab::Restore, e.status, body)
        }
    }
}

fn restore_body(
    state: &ConsoleState,
    who: &Signed,
    inst: &Instance,
    view: &RestoreView,
    events: Markup,
) -> Markup {
    let window = state.service.recovery_window(&inst.id).ok().flatten();
    let sets: Vec<_> = state
        .service
        .backup_sets(&inst.id)
        .unwrap_or_default()
        .into_iter()
        .rev()
        .filter(|b| b.status == BackupStatus::Success)
        .collect();
    let ro = who.read_only;
    html! {
        @if let Some((_, e)) = &view.error {
            @if error_field_of(view, e).is_empty() {
                (layout::error_box("Nothing was started:", e))
            } @else {
                div.notice.err role="alert" { "Nothing was started: correct the field marked below." }
            }
        }
        @if ro {
            p.notice.info { "This AccessKey is read-only: restores are shown, not started." }
        }
        div.cards {
            (restore_form(who, inst, RestoreKind::Clone, &sets, window, view))
            (restore_form(who, inst, RestoreKind::Databases, &sets, window, view))
            (restore_form(who, inst, RestoreKind::Tables, &sets, window, view))
        }
        (events)
    }
}

/// The field the view's error is shown under ("" for the top of the tab).
fn error_field_of(view: &RestoreView, e: &ApiError) -> &'static str {
    let by_time = view
        .error
        .as_ref()
        .is_some_and(|(k, _)| view.form(*k).by_time);
    restore_error_field(&e.code, by_time)
}

fn restore_field_error(view: &RestoreView, kind: RestoreKind, field: &str) -> Markup {
    let error = view
        .error(kind)
        .filter(|e| error_field_of(view, e) == field);
    html! {
        @if let Some(e) = error {
            p.fielderror role="alert" id=(format!("{}-{field}-error", kind.prefix())) { (e.message) " " span.code { (e.code) } }
        }
    }
}

fn restore_form(
    who: &Signed,
    inst: &Instance,
    kind: RestoreKind,
    sets: &[strata_catalog::BackupSet],
    window: Option<(DateTime<Utc>, DateTime<Utc>)>,
    view: &RestoreView,
) -> Markup {
    let ro = who.read_only;
    let v = view.form(kind);
    let p = kind.prefix();
    let invalid = |field: &str| {
        view.error(kind)
            .filter(|e| error_field_of(view, e) == field)
            .map(|_| "true")
    };
    let (title, action, button) = match kind {
        RestoreKind::Clone => ("Clone to a New Instance", "clone", "Clone Instance"),
        RestoreKind::Databases => (
            "Restore Databases to the Original Instance",
            "databases",
            "Restore Databases",
        ),
        RestoreKind::Tables => (
            "Restore Tables to the Original Instance",
            "tables",
            "Restore Tables",
        ),
    };
    html! {
        form.restore.timefilter method="post" action=(format!("{}/restore/{action}", base(&inst.id))) novalidate id=(format!("{p}-form")) {
            (layout::csrf(who))
            fieldset.card disabled[ro] {
                legend { (title) }
                @match kind {
                    RestoreKind::Clone => { p.hint { "Restores into a new instance that Strata starts and runs on this host; the original is not touched." } }
                    RestoreKind::Databases => { p.hint { "Each database is restored beside the original under its new name, which must not exist yet." } }
                    RestoreKind::Tables => { p.hint { "Each table is restored into its database beside the original under its new name (same schema), which must not exist yet." } }
                }
                div.field role="radiogroup" aria-labelledby=(format!("{p}-by")) {
                    span.label id=(format!("{p}-by")) { "Restore By" }
                    div.choices {
                        label.check { input type="radio" name="restore_by" value="BackupSet" checked[!v.by_time]; span { "Backup Set" } }
                        label.check { input type="radio" name="restore_by" value="BackupTime" checked[v.by_time]; span { "Point in Time" } }
                    }
                }
                div.field data-by="BackupSet" {
                    label for=(format!("{p}-set")) { "Backup Set" }
                    select id=(format!("{p}-set")) name="backup_id" aria-invalid=[invalid("set")] {
                        @for b in sets {
                            @let finished = b.finished_at.unwrap_or(b.started_at);
                            option value=(b.id) selected[v.backup_id == b.id] data-utc=(iso(finished)) title=(format!("finished {}", finished.format("%Y-%m-%d %H:%M:%S UTC"))) {
                                (b.id) " · " (finished.format("%Y-%m-%d %H:%M:%S UTC"))
                                @if b.method == BackupMethod::Snapshot { " · Snapshot" }
                            }
                        }
                    }
                    @if sets.is_empty() {
                        p.hint { "No successful backup set yet." }
                    }
                    (restore_field_error(view, kind, "set"))
                }
                div.field data-by="BackupTime" {
                    label for=(format!("{p}-time")) { "Point in Time" }
                    input id=(format!("{p}-time")) type="datetime-local" step="1" data-utc-for="restore_time" data-seconds
                        data-min-utc=[window.map(|w| iso(w.0))] data-max-utc=[window.map(|w| iso(w.1))]
                        aria-invalid=[invalid("time")];
                    input type="hidden" name="restore_time" value=(v.restore_time);
                    p.hint {
                        @match window {
                            Some((from, to)) => { "Your local time, within the recoverable window " span.bounds id=(format!("{p}-window")) { (time(from)) " – " (time(to)) } "." }
                            None => { "No recoverable window: log backup is off or no backup has finished yet." }
                        }
                    }
                    (restore_field_error(view, kind, "time"))
                }
                @if kind == RestoreKind::Databases {
                    div.field role="group" aria-labelledby="db-names-label" {
                        span.label #db-names-label { "Databases" }
                        div.dbrows {
                            @for i in 0..DATABASE_ROWS.max(v.databases.len()) {
                                @let (name, new) = v.databases.get(i).cloned().unwrap_or_default();
                                div.dbrow {
                                    input name="db_name" value=(name) placeholder="database" aria-label=(format!("Database {}", i + 1))
                                        aria-invalid=[invalid("databases")] spellcheck="false" list="db-choices" autocomplete="off";
                                    span.muted { "as" }
                                    input name="db_newname" value=(new) placeholder="new name" aria-label=(format!("Restore database {} as", i + 1))
                                        aria-invalid=[invalid("databases")] spellcheck="false";
                                }
                            }
                        }
                        datalist #db-choices {
                            @if let Some(Ok(names)) = view.choices.as_ref().map(|c| &c.databases) {
                                @for n in names { option value=(n) {} }
                            }
                        }
                        p.hint #db-choices-hint data-url=(format!("{}/restore/databases", base(&inst.id))) {
                            @match &view.choices {
                                Some(SetChoices { backup_id, databases: Ok(names) }) => {
                                    "Backup set " (backup_id) " holds " (names.len()) " databases: pick one in each row."
                                }
                                Some(SetChoices { backup_id, databases: Err(why) }) => {
                                    "No list of databases for backup set " (backup_id) ": " (why)
                                }
                                None => {}
                            }
                        }
                        p.hint { "Leave rows you do not need empty." }
                        (restore_field_error(view, kind, "databases"))
                    }
                }
                @if kind == RestoreKind::Tables {
                    (table_fields(v, &invalid))
                    (restore_field_error(view, kind, "databases"))
                }
                @if !ro {
                    div.formactions { button.primary type="submit" id=(format!("{p}-submit")) { (button) } }
                }
            }
        }
    }
}

/// The Tables form's database and its rows of table and new name.
fn table_fields(v: &RestoreForm, invalid: &dyn Fn(&str) -> Option<&'static str>) -> Markup {
    html! {
        div.field {
            label for="tbl-db" { "Database" }
            input #tbl-db name="tbl_db" value=(v.database) placeholder="database" spellcheck="false"
                aria-invalid=[invalid("databases")];
        }
        div.field role="group" aria-labelledby="tbl-names-label" {
            span.label #tbl-names-label { "Tables" }
            div.dbrows {
                @for i in 0..DATABASE_ROWS.max(v.tables.len()) {
                    @let (name, new) = v.tables.get(i).cloned().unwrap_or_default();
                    div.dbrow {
                        input name="table_name" value=(name) placeholder="schema.table" aria-label=(format!("Table {}", i + 1))
                            aria-invalid=[invalid("databases")] spellcheck="false";
                        span.muted { "as" }
                        input name="table_newname" value=(new) placeholder="new name" aria-label=(format!("Restore table {} as", i + 1))
                            aria-invalid=[invalid("databases")] spellcheck="false";
                    }
                }
            }
            p.hint { "A table without a schema is in " code { "public" } ". Leave rows you do not need empty." }
        }
    }
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
    // The figures may need a repository walk (before the first usage
    // sample): on the blocking pool.
    let (service, instance_id) = (Arc::clone(&state.service), inst.id.clone());
    let now = state.service.now();
    let body =
        tokio::task::spawn_blocking(move || crate::storage::tab(&service, &instance_id, now))
            .await
            .unwrap_or_else(|e| {
                layout::error_box(
                    "Storage could not be read:",
                    &strata_api::ApiError::new(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "InternalError",
                        format!("the storage figures stopped: {e}"),
                    ),
                )
            });
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
            interval: "-1".into(),
            advanced_on: false,
            archive_days: "0".into(),
            archive_policy: "ByMonth".into(),
            archive_count: "1".into(),
            keep_last: "0".into(),
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

    fn fields(pairs: &[(&str, &str)]) -> Fields {
        Fields(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn retention_options_become_the_api_parameters() {
        let s = Strategy::from_form(&fields(&[
            ("day", "Monday"),
            ("day", "Friday"),
            ("window", "02:00Z-03:00Z"),
            ("retention", "7"),
            ("log_retention", "7"),
            ("interval", "60"),
            ("advanced", "on"),
            ("archive_days", ""),
            ("archive_policy", "ByWeek"),
            ("archive_count", "2"),
            ("keep_last", " 5 "),
        ]));
        let params = s.params("pg-1");
        let get = |name: &str| {
            params
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(get("BackupInterval"), Some("60"));
        assert_eq!(get("EnableAdvancedBackupPolicy"), Some("1"));
        // An empty field is off, as its hint says, not "keep the current value".
        assert_eq!(get("ArchiveBackupRetentionPeriod"), Some("0"));
        assert_eq!(get("ArchiveBackupKeepPolicy"), Some("ByWeek"));
        assert_eq!(get("ArchiveBackupKeepCount"), Some("2"));
        assert_eq!(get("StrataKeepLastBackups"), Some("5"));
        assert_eq!(
            error_field("InvalidBackupInterval.NotSupported"),
            "interval"
        );
        assert_eq!(
            error_field("InvalidArchiveBackupPolicy.Malformed"),
            "archive"
        );
    }

    #[test]
    fn rule_edits_become_action_type_entries() {
        let mut stored = policy::default_policy("pg-1", Utc::now());
        stored.advanced_data_rules.push(strata_catalog::DataRule {
            id: "monthly-1".into(),
            kind: policy::parse_rule_kind("Monthly", "Last").unwrap(),
            retention_days: 365,
        });
        let draft = RuleDraft {
            id: String::new(),
            kind: "Monthly".into(),
            value: "1,15".into(),
            retention: "90".into(),
        };
        // A new rule gets the first id of its kind not taken.
        assert_eq!(
            rule_params("pg-1", RuleOp::Create, &draft, &stored),
            vec![
                ("DBInstanceId", "pg-1".to_string()),
                ("AdvancedDataPolicies.1.ActionType", "CREATE".into()),
                ("AdvancedDataPolicies.1.StrategyId", "monthly-2".into()),
                ("AdvancedDataPolicies.1.FilterType", "Monthly".into()),
                ("AdvancedDataPolicies.1.FilterValue", "1,15".into()),
                ("AdvancedDataPolicies.1.RetentionType", "Days".into()),
                ("AdvancedDataPolicies.1.RetentionValue", "90".into()),
            ]
        );
        let existing = RuleDraft {
            id: "monthly-1".into(),
            ..draft
        };
        assert_eq!(
            rule_params("pg-1", RuleOp::Update, &existing, &stored)[2],
            ("AdvancedDataPolicies.1.StrategyId", "monthly-1".to_string())
        );
        assert_eq!(
            rule_params("pg-1", RuleOp::Delete, &existing, &stored),
            vec![
                ("DBInstanceId", "pg-1".to_string()),
                ("AdvancedDataPolicies.1.ActionType", "DELETE".into()),
                ("AdvancedDataPolicies.1.StrategyId", "monthly-1".into()),
            ]
        );
        assert_eq!(RuleOp::parse("remove"), None);
    }

    #[test]
    fn kept_cells_offer_keep_or_release() {
        let admin = Signed {
            id: "s".into(),
            key_id: "k".into(),
            read_only: false,
            csrf: "t".into(),
        };
        let free = serde_json::json!({"BackupId": "17", "BackupStatus": "Success"});
        let cell = kept_cell("/console/instances/pg-1", &admin, &free).into_string();
        assert!(
            cell.contains(r#"value="keep""#) && !cell.contains(r#"value="release""#),
            "{cell}"
        );
        let kept = serde_json::json!({
            "BackupId": "17",
            "BackupStatus": "Success",
            "StrataKeepUntil": "2027-03-01T00:00:00Z",
            "StrataKeepNote": "audit",
        });
        let cell = kept_cell("/console/instances/pg-1", &admin, &kept).into_string();
        assert!(
            cell.contains(r#"value="release""#) && cell.contains("audit"),
            "{cell}"
        );
        assert!(
            cell.contains(r#"datetime="2027-03-01T00:00:00Z""#),
            "{cell}"
        );
        let reader = Signed {
            read_only: true,
            ..admin
        };
        let cell = kept_cell("/console/instances/pg-1", &reader, &kept).into_string();
        assert!(!cell.contains("<form") && cell.contains("audit"), "{cell}");
        assert_eq!(keep_until(""), "forever");
        assert_eq!(keep_until("2027-03-01"), "2027-03-01T00:00:00Z");
    }

    #[test]
    fn restore_forms_become_the_api_parameters() {
        let by_set = RestoreForm::from_form(&fields(&[
            ("restore_by", "BackupSet"),
            ("backup_id", "1764000000000"),
            ("restore_time", "2026-11-25T10:00:07Z"),
        ]));
        assert_eq!(
            by_set.source_params("pg-1"),
            vec![
                ("DBInstanceId", "pg-1".to_string()),
                ("BackupId", "1764000000000".to_string())
            ]
        );
        let by_time = RestoreForm::from_form(&fields(&[
            ("restore_by", "BackupTime"),
            ("backup_id", "1764000000000"),
            ("restore_time", " 2026-11-25T10:00:07Z "),
            ("db_name", "shop"),
            ("db_newname", "shop_copy"),
            ("db_name", ""),
            ("db_newname", ""),
            ("db_name", "crm"),
            ("db_newname", ""),
        ]));
        assert_eq!(
            by_time.source_params("pg-1")[1],
            ("RestoreTime", "2026-11-25T10:00:07Z".to_string())
        );
        // Blank rows are dropped; a missing new name is left to the API.
        assert_eq!(
            serde_json::from_str::<Value>(&by_time.table_meta()).unwrap(),
            serde_json::json!([
                {"type": "db", "name": "shop", "newname": "shop_copy"},
                {"type": "db", "name": "crm", "newname": ""}
            ])
        );
        let specs = strata_service::parse_table_meta(&by_time.table_meta());
        assert!(specs
            .unwrap_err()
            .message
            .contains("\"crm\" needs a \"newname\""));
    }

    #[test]
    fn download_links_to_this_server_become_relative() {
        let set = serde_json::json!({
            "BackupDownloadURL": "http://0.0.0.0:8080/download/backups/pg-1/17.tar?Expires=1&Signature=ab",
            "StrataBackupDownloadURLZstd": "https://dl.example/download/backups/pg-1/17.tar.zst?Expires=1&Signature=cd",
        });
        let origin = "http://0.0.0.0:8080";
        assert_eq!(
            download_link(&set, "BackupDownloadURL", origin),
            Some("/download/backups/pg-1/17.tar?Expires=1&Signature=ab")
        );
        // A configured public address is kept as it is.
        assert!(download_link(&set, "StrataBackupDownloadURLZstd", origin)
            .is_some_and(|l| l.starts_with("https://dl.example/")));
        let failed = serde_json::json!({"BackupStatus": "Failed"});
        assert_eq!(download_link(&failed, "BackupDownloadURL", origin), None);
        let cell = download_cell(&failed, origin).into_string();
        assert!(cell.contains("—") && !cell.contains("href"), "{cell}");
    }

    #[test]
    fn table_forms_restore_into_their_own_database() {
        let form = RestoreForm::from_form(&fields(&[
            ("restore_by", "BackupSet"),
            ("backup_id", "1764000000000"),
            ("tbl_db", " shop "),
            ("table_name", "orders"),
            ("table_newname", "orders_back"),
            ("table_name", ""),
            ("table_newname", ""),
            ("table_name", "sales.items"),
            ("table_newname", "items_back"),
        ]));
        let meta = form.tables_meta();
        assert_eq!(
            serde_json::from_str::<Value>(&meta).unwrap(),
            serde_json::json!([{"type": "db", "name": "shop", "tables": [
                {"type": "table", "name": "orders", "newname": "orders_back"},
                {"type": "table", "name": "sales.items", "newname": "items_back"}
            ]}])
        );
        // The service reads it as tables going into `shop` itself.
        let specs = strata_service::parse_table_meta(&meta).unwrap();
        assert_eq!(specs[0].newname, None);
        assert_eq!(specs[0].tables.len(), 2);
        // A qualified new name is refused with the API's words.
        let bad = RestoreForm::from_form(&fields(&[
            ("tbl_db", "shop"),
            ("table_name", "orders"),
            ("table_newname", "sales.orders_back"),
        ]));
        let e = strata_service::parse_table_meta(&bad.tables_meta()).unwrap_err();
        assert!(e.message.contains("must be unqualified"), "{}", e.message);
    }

    #[test]
    fn drill_results_show_with_their_time_and_findings() {
        let passed = drill_cell(&serde_json::json!({
            "StrataDrillStatus": "Passed",
            "StrataDrillTime": "2026-11-25T10:00:07Z",
            "StrataDrillMessage": "pg_amcheck clean over 3 databases",
        }))
        .into_string();
        assert!(passed.contains(r#"class="badge ok""#), "{passed}");
        assert!(
            passed
                .contains(r#"title="2026-11-25 10:00:07 UTC · pg_amcheck clean over 3 databases""#),
            "{passed}"
        );
        assert!(
            passed.contains(r#"data-utc="2026-11-25T10:00:07Z""#),
            "{passed}"
        );
        let failed = drill_cell(&serde_json::json!({"StrataDrillStatus": "Failed"})).into_string();
        assert!(failed.contains(r#"class="badge err""#), "{failed}");
        let none = drill_cell(&serde_json::json!({"BackupId": "1"})).into_string();
        assert!(none.contains("None") && !none.contains("badge"), "{none}");
    }

    #[test]
    fn restore_errors_land_under_their_fields() {
        assert_eq!(restore_error_field("InvalidRestoreTime", true), "time");
        assert_eq!(
            restore_error_field("InvalidRestoreTime.Format", true),
            "time"
        );
        assert_eq!(restore_error_field("MissingParameter", true), "time");
        assert_eq!(restore_error_field("MissingParameter", false), "set");
        assert_eq!(
            restore_error_field("InvalidBackupSetID.NotFound", false),
            "set"
        );
        assert_eq!(
            restore_error_field("InvalidDBName.Duplicate", false),
            "databases"
        );
        assert_eq!(
            restore_error_field("InvalidTableMeta.Malformed", true),
            "databases"
        );
        assert_eq!(
            restore_error_field("Forbidden.ReadOnlyAccessKey", false),
            ""
        );
    }

    #[test]
    fn windows_offer_every_hour_and_the_current_one() {
        assert_eq!(windows("02:00Z-03:00Z").len(), 24);
        let w = windows("23:30Z-00:30Z");
        assert_eq!((w.len(), w[0].as_str()), (25, "23:30Z-00:30Z"));
        assert_eq!(window_label("02:00Z-03:00Z"), "02:00–03:00 UTC");
    }
}
