//! The Restore tab's recovery events (`StrataDescribeRecoveryEvents`): a
//! timeline strip across the recoverable window with one marker per event,
//! zoomed with `from`/`to` query parameters, the filtered list below it, and
//! per event the restores that stop just before its transaction
//! (`RestoreTable` into the original, `CloneDBInstance`, both with
//! `StrataRestoreTargetXid` and `StrataRestoreTargetInclusive=false`).
//!
//! Every name here comes from the monitored server's catalog and is data:
//! it is only ever put in the page through maud, which escapes it.

use chrono::{DateTime, Duration, Utc};
use maud::{html, Markup};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use strata_api::ApiError;
use strata_catalog::Instance;
use strata_service::policy::format_seconds;

use crate::layout::{self, parse_api_time};
use crate::session::Signed;
use crate::{url_encode, ConsoleState, Fields};

/// Events listed per page.
const PAGE_SIZE: u64 = 30;
/// Events one `StrataDescribeRecoveryEvents` page holds at most.
const API_PAGE: u64 = 100;
/// Markers drawn at most; a busier period is zoomed into.
const MAX_MARKERS: u64 = 500;
/// The narrowest period the strip zooms into.
const MIN_SPAN_SECONDS: i64 = 2;
/// Longest name PostgreSQL keeps (NAMEDATALEN - 1 bytes).
const MAX_NAME_BYTES: usize = 63;

/// A period of time, start before end.
type Period = (DateTime<Utc>, DateTime<Utc>);

/// Where the strip's zoom links lead.
#[derive(Debug, PartialEq)]
struct Zooms {
    /// The middle half.
    zoom_in: Option<Period>,
    /// Twice as long, within the window.
    zoom_out: Option<Period>,
    /// The four quarters.
    quarters: Vec<Period>,
}

/// The Restore tab's event filters and zoom, from the query string.
#[derive(Debug, Default, Clone, Deserialize)]
pub struct EventQuery {
    #[serde(default)]
    kind: String,
    #[serde(default)]
    db: String,
    #[serde(default)]
    table: String,
    /// UTC, `yyyy-MM-ddTHH:mm[:ss]Z`; with `to`, the strip's period.
    #[serde(default)]
    from: String,
    #[serde(default)]
    to: String,
    #[serde(default)]
    page: String,
}

impl EventQuery {
    /// The query string for these filters over `period` (none: the whole
    /// window) at page 1.
    fn href(&self, base: &str, period: Option<Period>) -> String {
        let (from, to) = match period {
            Some((f, t)) => (format_seconds(f), format_seconds(t)),
            None => (String::new(), String::new()),
        };
        self.link(base, &from, &to, 1)
    }

    fn link(&self, base: &str, from: &str, to: &str, page: u64) -> String {
        let mut url = format!("{base}/restore?");
        for (k, v) in [
            ("kind", self.kind.as_str()),
            ("db", &self.db),
            ("table", &self.table),
            ("from", from),
            ("to", to),
        ] {
            if !v.is_empty() {
                url.push_str(&format!("{k}={}&", url_encode(v)));
            }
        }
        url.push_str(&format!("page={page}#events"));
        url
    }

    /// The API's filter parameters (the period aside).
    fn filter_params(&self) -> Vec<(&'static str, String)> {
        [
            ("EventType", &self.kind),
            ("DBName", &self.db),
            ("TableName", &self.table),
        ]
        .into_iter()
        .filter(|(_, v)| !v.trim().is_empty())
        .map(|(k, v)| (k, v.trim().to_string()))
        .collect()
    }

    fn page_number(&self) -> u64 {
        self.page.parse().unwrap_or(1).max(1)
    }
}

/// One event as `StrataDescribeRecoveryEvents` lists it.
#[derive(Debug, Clone, PartialEq)]
struct Event {
    kind: String,
    time: DateTime<Utc>,
    xid: Option<String>,
    /// The database's name (none when only its OID is known).
    database: Option<String>,
    db_oid: Option<u64>,
    schema: Option<String>,
    table: Option<String>,
    relfilenode: Option<u64>,
    rows: Option<u64>,
    lsn: String,
    restore_point: Option<String>,
    /// Where "just before" is when it is not just before the commit (a
    /// dropped database: see `RestoreTargets.JustBefore`).
    before_lsn: Option<String>,
}

impl Event {
    fn from_api(v: &Value) -> Option<Event> {
        let s = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
        let n = |k: &str| v.get(k).and_then(Value::as_u64);
        let db_oid = n("DBOid");
        // A database Strata has no name for is listed by its OID.
        let database = s("DBName").filter(|d| db_oid.is_none_or(|o| *d != o.to_string()));
        Some(Event {
            kind: s("EventType")?,
            time: parse_api_time(&s("EventTime")?)?,
            xid: s("Xid"),
            database,
            db_oid,
            schema: s("SchemaName"),
            table: s("TableName"),
            relfilenode: n("RelFileNode"),
            rows: n("Rows"),
            lsn: s("Lsn").unwrap_or_default(),
            restore_point: s("RestorePointName"),
            before_lsn: v
                .pointer("/RestoreTargets/JustBefore/StrataRestoreTargetLsn")
                .and_then(Value::as_str)
                .map(str::to_string),
        })
    }

    /// `schema.table`, `relfilenode N`, or none.
    fn table_label(&self) -> Option<String> {
        match (&self.schema, &self.table, self.relfilenode) {
            (Some(s), Some(t), _) => Some(format!("{s}.{t}")),
            (_, _, Some(f)) => Some(format!("relfilenode {f}")),
            _ => None,
        }
    }

    fn database_label(&self) -> Option<String> {
        match (&self.database, self.db_oid) {
            (Some(d), _) => Some(d.clone()),
            (None, Some(o)) => Some(format!("database OID {o}")),
            _ => None,
        }
    }

    /// An element id for the event's list row (a commit may touch several
    /// tables, so the file and kind are part of it).
    fn key(&self) -> String {
        let raw = format!(
            "event-{}-{}-{}",
            self.lsn,
            self.kind,
            self.relfilenode.unwrap_or(0)
        );
        raw.chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect()
    }

    /// What the marker's tooltip says.
    fn summary(&self) -> String {
        let mut parts = vec![self.kind.clone(), utc(self.time)];
        if let Some(t) = self.table_label() {
            parts.push(t);
        } else if let Some(d) = self.database_label() {
            parts.push(d);
        }
        if let Some(n) = &self.restore_point {
            parts.push(n.clone());
        }
        if let Some(x) = &self.xid {
            parts.push(format!("xid {x}"));
        }
        if let Some(r) = self.rows {
            parts.push(format!("{r} rows"));
        }
        parts.join(" · ")
    }

    /// The restore of the one table this event changed, if it names one.
    fn table_restore(&self) -> Option<EventRestore> {
        if !matches!(
            self.kind.as_str(),
            "DropTable" | "Truncate" | "Delete" | "Update"
        ) {
            return None;
        }
        let (xid, db, schema, table) = (
            self.xid.clone()?,
            self.database.clone()?,
            self.schema.clone()?,
            self.table.clone()?,
        );
        let newname = before_name(&table, &xid);
        Some(EventRestore::Table {
            xid,
            db,
            schema,
            table,
            newname,
        })
    }

    fn database_restore(&self) -> Option<EventRestore> {
        if self.kind != "DropDatabase" {
            return None;
        }
        let (xid, db) = (self.xid.clone()?, self.database.clone()?);
        let newname = before_name(&db, &xid);
        let lsn = self.before_lsn.clone();
        Some(EventRestore::Database {
            xid,
            lsn,
            db,
            newname,
        })
    }
}

/// `<name>_before_<xid>`, the name cut (at a character) to fit PostgreSQL.
fn before_name(name: &str, xid: &str) -> String {
    let suffix = format!("_before_{xid}");
    let mut head = String::new();
    for c in name.chars() {
        if head.len() + c.len_utf8() + suffix.len() > MAX_NAME_BYTES {
            break;
        }
        head.push(c);
    }
    head + &suffix
}

/// A quarter's bound: the time of day, with the date when the quarter is a
/// day or longer.
fn short(t: DateTime<Utc>, other: DateTime<Utc>) -> String {
    if (t - other).abs() >= Duration::days(1) {
        t.format("%m-%d %H:%M").to_string()
    } else {
        t.format("%H:%M:%S").to_string()
    }
}

fn utc(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

/// A restore to just before an event's transaction, as its form sends it.
#[derive(Debug, Clone, PartialEq)]
pub enum EventRestore {
    /// One table into the original instance under a new name.
    Table {
        xid: String,
        db: String,
        schema: String,
        table: String,
        newname: String,
    },
    /// A dropped database into the original instance under a new name;
    /// `lsn`: where it was still intact (before its transaction's commit).
    Database {
        xid: String,
        lsn: Option<String>,
        db: String,
        newname: String,
    },
    /// The whole instance into a new one (`lsn` as for `Database`).
    Clone { xid: String, lsn: Option<String> },
}

impl EventRestore {
    /// The submitted form, or the error for a form no page sends.
    pub fn from_form(f: &Fields) -> Result<EventRestore, ApiError> {
        let v = |k: &str| f.get(k).trim().to_string();
        let lsn = || Some(v("lsn")).filter(|l| !l.is_empty());
        match f.get("op") {
            "table" => Ok(EventRestore::Table {
                xid: v("xid"),
                db: f.get("db").to_string(),
                schema: f.get("schema").to_string(),
                table: f.get("table").to_string(),
                newname: v("newname"),
            }),
            "database" => Ok(EventRestore::Database {
                xid: v("xid"),
                lsn: lsn(),
                db: f.get("db").to_string(),
                newname: v("newname"),
            }),
            "clone" => Ok(EventRestore::Clone {
                xid: v("xid"),
                lsn: lsn(),
            }),
            other => Err(ApiError::bad(
                "InvalidParameter",
                format!(
                    "the form asked for {}, which is none of table, database or clone",
                    strata_api::quoted(other)
                ),
            )),
        }
    }

    fn xid(&self) -> &str {
        match self {
            EventRestore::Table { xid, .. }
            | EventRestore::Database { xid, .. }
            | EventRestore::Clone { xid, .. } => xid,
        }
    }

    fn lsn(&self) -> Option<&str> {
        match self {
            EventRestore::Table { .. } => None,
            EventRestore::Database { lsn, .. } | EventRestore::Clone { lsn, .. } => lsn.as_deref(),
        }
    }

    /// The action and its parameters.
    pub fn call(&self, instance_id: &str) -> (&'static str, Vec<(&'static str, String)>) {
        let target = match self.lsn() {
            Some(lsn) => ("StrataRestoreTargetLsn", lsn.to_string()),
            None => ("StrataRestoreTargetXid", self.xid().to_string()),
        };
        let mut params = vec![
            ("DBInstanceId", instance_id.to_string()),
            target,
            ("StrataRestoreTargetInclusive", "false".to_string()),
        ];
        let meta = match self {
            EventRestore::Table {
                db,
                schema,
                table,
                newname,
                ..
            } => json!([{"type": "db", "name": db, "tables": [
                {"type": "table", "name": format!("{schema}.{table}"), "newname": newname}
            ]}]),
            EventRestore::Database { db, newname, .. } => {
                json!([{"type": "db", "name": db, "newname": newname}])
            }
            EventRestore::Clone { .. } => return ("CloneDBInstance", params),
        };
        params.push(("TableMeta", meta.to_string()));
        ("RestoreTable", params)
    }

    /// What was started, for the Task Center's notice.
    pub fn started(&self, instance_id: &str, answer: &Map<String, Value>) -> String {
        let field = |k: &str| {
            answer
                .get(k)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        };
        match self {
            EventRestore::Table {
                xid,
                db,
                schema,
                table,
                newname,
            } => format!(
                "Restore task {} started: table {schema}.{table} of database {db} as it was just before transaction {xid}, restored as {schema}.{newname} into {instance_id}.",
                field("StrataJobId")
            ),
            EventRestore::Database { xid, db, newname, .. } => format!(
                "Restore task {} started: database {db} as it was just before transaction {xid}, restored as {newname} into {instance_id}.",
                field("StrataJobId")
            ),
            EventRestore::Clone { xid, .. } => format!(
                "New instance {} is being created from {instance_id} as it was just before transaction {xid}; it is listed as Running once its restore finishes.",
                field("DBInstanceId")
            ),
        }
    }
}

/// The strip's period: the query's `from`/`to` within reason, else the
/// recoverable window.
fn period(q: &EventQuery, window: Option<Period>) -> Option<Period> {
    let from = parse_api_time(&q.from);
    let to = parse_api_time(&q.to);
    let (w0, w1) = match window {
        Some(w) => (Some(w.0), Some(w.1)),
        None => (None, None),
    };
    let (a, b) = (from.or(w0)?, to.or(w1)?);
    (b > a).then_some((a, b))
}

/// The periods the strip's zoom links lead to from `(a, b)`.
fn zooms((a, b): Period, window: Option<Period>) -> Zooms {
    let d = b - a;
    let narrow_enough = d < Duration::seconds(MIN_SPAN_SECONDS * 2);
    let zoom_in = (!narrow_enough).then(|| (a + d / 4, b - d / 4));
    let zoom_out = window.and_then(|(w0, w1)| {
        let (o0, o1) = ((a - d / 2).max(w0), (b + d / 2).min(w1));
        (o0 < a || o1 > b).then_some((o0, o1))
    });
    let quarters = if narrow_enough {
        Vec::new()
    } else {
        (0..4)
            .map(|i| (a + d * i / 4, a + d * (i + 1) / 4))
            .collect()
    };
    Zooms {
        zoom_in,
        zoom_out,
        quarters,
    }
}

/// An end time for the API that keeps the events of its last second:
/// events are shown to the second, so one shown at the end is in the period.
/// Text that is no time goes as it is, for the API to refuse.
fn through_second(to: &str) -> String {
    match parse_api_time(to) {
        Some(t) => format_seconds(t + Duration::seconds(1)),
        None => to.to_string(),
    }
}

/// Where in the period a moment falls, in percent of the strip's width.
fn position(t: DateTime<Utc>, (a, b): Period) -> Option<f64> {
    let span = (b - a).num_milliseconds() as f64;
    let at = (t - a).num_milliseconds() as f64;
    (span > 0.0 && (0.0..=span).contains(&at)).then(|| at / span * 100.0)
}

/// The events of one API call (a page), or its error.
async fn fetch(
    state: &ConsoleState,
    who: &Signed,
    inst: &Instance,
    period: (Option<String>, Option<String>),
    q: &EventQuery,
    (page, size): (u64, u64),
) -> Result<(Vec<Event>, u64), ApiError> {
    let mut params = vec![("DBInstanceId", inst.id.to_string())];
    if let Some(f) = period.0 {
        params.push(("StartTime", f));
    }
    if let Some(t) = period.1 {
        params.push(("EndTime", t));
    }
    params.extend(q.filter_params());
    params.push(("PageSize", size.to_string()));
    params.push(("PageNumber", page.to_string()));
    let answer = state
        .call(who, "StrataDescribeRecoveryEvents", params)
        .await?;
    let events = answer
        .get("Items")
        .and_then(|i| i.get("RecoveryEvent"))
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Event::from_api).collect())
        .unwrap_or_default();
    let total = answer
        .get("TotalRecordCount")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    Ok((events, total))
}

/// The events section of the Restore tab; `error` is what the service
/// answered a restore sent from it.
pub async fn section(
    state: &ConsoleState,
    who: &Signed,
    inst: &Instance,
    q: &EventQuery,
    error: Option<&ApiError>,
) -> Markup {
    let base = format!("/console/instances/{}", url_encode(&inst.id));
    let window = state.service.recovery_window(&inst.id).ok().flatten();
    let span = period(q, window);
    let list_period = (
        (!q.from.is_empty()).then(|| q.from.clone()),
        (!q.to.is_empty()).then(|| through_second(&q.to)),
    );
    let list = fetch(
        state,
        who,
        inst,
        list_period,
        q,
        (q.page_number(), PAGE_SIZE),
    )
    .await;
    let strip = match span {
        Some((a, b)) => {
            let bounds = (
                Some(format_seconds(a)),
                Some(through_second(&format_seconds(b))),
            );
            let mut markers = Vec::new();
            let mut total = 0;
            let mut page = 1;
            let mut failed = None;
            while (page - 1) * API_PAGE < MAX_MARKERS {
                match fetch(state, who, inst, bounds.clone(), q, (page, API_PAGE)).await {
                    Ok((events, n)) => {
                        total = n;
                        let done = events.len() < API_PAGE as usize;
                        markers.extend(events);
                        if done || markers.len() as u64 >= total {
                            break;
                        }
                    }
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
                page += 1;
            }
            match failed {
                Some(e) => Err(e),
                None => Ok((markers, total)),
            }
        }
        None => Ok((Vec::new(), 0)),
    };
    html! {
        section.card.events #events aria-labelledby="events-title" {
            h2 #events-title { "Recovery Events" }
            p.hint {
                "Transactions that destroyed data (tables dropped or truncated, databases dropped, many rows deleted or updated at once) and restore points, decoded from the log backup as it arrives. "
                "Each can be undone by restoring to just before its transaction."
            }
            @if let Some(e) = error {
                div #event-error { (layout::error_box("Nothing was started:", e)) }
            }
            (filters(&base, q))
            @match (&strip, span) {
                (Err(e), _) => { (layout::error_box("The timeline could not be shown:", e)) }
                (Ok(_), None) => { p.muted #timeline-none { "No recoverable window: log backup is off or no backup has finished yet." } }
                (Ok((markers, total)), Some(span)) => { (timeline(&base, q, span, window, markers, *total)) }
            }
            @match &list {
                Err(e) => { (layout::error_box("The list could not be shown:", e)) }
                Ok((events, total)) => {
                    (event_table(&base, who, events))
                    (pager(&base, q, *total))
                }
            }
        }
    }
}

fn filters(base: &str, q: &EventQuery) -> Markup {
    let filtered = [&q.kind, &q.db, &q.table, &q.from, &q.to]
        .iter()
        .any(|v| !v.is_empty());
    html! {
        form.filters.timefilter #event-filters method="get" action=(format!("{base}/restore")) {
            label.field {
                span { "Kind" }
                select name="kind" {
                    option value="" { "All kinds" }
                    @for k in strata_api::EVENT_KINDS {
                        option value=(k) selected[q.kind == k] { (k) }
                    }
                }
            }
            label.field {
                span { "Database" }
                input name="db" value=(q.db) spellcheck="false" placeholder="any";
            }
            label.field {
                span { "Table" }
                input name="table" value=(q.table) spellcheck="false" placeholder="name or schema.name";
            }
            label.field {
                span { "From" }
                input type="datetime-local" step="1" data-seconds data-utc-for="from";
            }
            input type="hidden" name="from" value=(q.from);
            label.field {
                span { "To" }
                input type="datetime-local" step="1" data-seconds data-utc-for="to";
            }
            input type="hidden" name="to" value=(q.to);
            button.secondary type="submit" #event-search { "Search" }
            @if filtered {
                a.button.ghost href=(format!("{base}/restore#events")) { "Reset" }
            }
        }
    }
}

/// Marker shapes, drawn around (0, 0).
fn shape(kind: &str) -> &'static str {
    match kind {
        "DropTable" => "M-6,-6 L6,6 M6,-6 L-6,6",
        "DropDatabase" => "M-7,-7 H7 V7 H-7 Z",
        "Truncate" => "M0,-7 L7,6 H-7 Z",
        "Delete" => "M-6,0 A6,6 0 1,0 6,0 A6,6 0 1,0 -6,0 Z",
        "Update" => "M0,-7 L7,0 L0,7 L-7,0 Z",
        _ => "M-1,-9 V9 M-1,-9 L7,-5 L-1,-1",
    }
}

fn timeline(
    base: &str,
    q: &EventQuery,
    span: Period,
    window: Option<Period>,
    markers: &[Event],
    total: u64,
) -> Markup {
    let Zooms {
        zoom_in,
        zoom_out,
        quarters,
    } = zooms(span, window);
    let whole = window.is_some_and(|w| w == span);
    let label = format!("Recovery events from {} to {}", utc(span.0), utc(span.1));
    html! {
        div.timeline #timeline data-from=(format_seconds(span.0)) data-to=(format_seconds(span.1)) {
            div.legend aria-hidden="true" {
                @for k in strata_api::EVENT_KINDS {
                    span.evkey {
                        svg width="16" height="16" viewBox="-9 -9 18 18" class=(format!("mark {}", k.to_ascii_lowercase())) { path d=(shape(k)) {} }
                        (k)
                    }
                }
            }
            svg.strip role="group" aria-label=(label) width="100%" height="44" {
                // SVG elements are closed explicitly: the HTML parser does not
                // self-close them.
                line.axisline x1="0" x2="100%" y1="22" y2="22" {}
                @for e in markers {
                    @if let Some(x) = position(e.time, span) {
                        a.marker href=(format!("#{}", e.key())) aria-label=(e.summary())
                            data-summary=(e.summary()) data-kind=(e.kind) data-xid=[e.xid.as_deref()]
                            data-table=[e.table_label()] data-utc=(format_seconds(e.time)) {
                            title { (e.summary()) }
                            svg x=(format!("{x:.3}%")) y="22" overflow="visible" class=(format!("mark {}", e.kind.to_ascii_lowercase())) {
                                path d=(shape(&e.kind)) {}
                            }
                        }
                    }
                }
            }
            div.bounds {
                span #timeline-from { (utc(span.0)) }
                span #timeline-to { (utc(span.1)) }
            }
            p.timeinfo #timeline-info aria-live="polite" { "Point at or focus a marker to see the event." }
            @if total > markers.len() as u64 {
                p.hint { (markers.len()) " of " (total) " events drawn: zoom in to see them all." }
            }
            @if !quarters.is_empty() {
                nav.quarters aria-label="Zoom into a quarter" {
                    @for (a, b) in &quarters {
                        a.quarter href=(q.href(base, Some((*a, *b)))) data-from=(format_seconds(*a)) data-to=(format_seconds(*b))
                            aria-label=(format!("Zoom into {} – {}", utc(*a), utc(*b))) {
                            (short(*a, *b)) " – " (short(*b, *a))
                        }
                    }
                }
            }
            nav.zoom aria-label="Zoom" {
                @if let Some(p) = zoom_in { a.button.ghost #zoom-in href=(q.href(base, Some(p))) { "Zoom in" } }
                @if let Some(p) = zoom_out { a.button.ghost #zoom-out href=(q.href(base, Some(p))) { "Zoom out" } }
                @if !whole && window.is_some() { a.button.ghost #zoom-all href=(q.href(base, None)) { "Whole window" } }
            }
        }
    }
}

fn event_table(base: &str, who: &Signed, events: &[Event]) -> Markup {
    html! {
        div.tablewrap {
            table.data #event-list {
                thead { tr {
                    th scope="col" { "Kind" }
                    th scope="col" { "Time (UTC)" }
                    th scope="col" { "Database" }
                    th scope="col" { "Table" }
                    th scope="col" { "Rows" }
                    th scope="col" { "Xid" }
                    @if !who.read_only { th scope="col" { "Restore" } }
                } }
                tbody {
                    @for e in events {
                        tr id=(e.key()) data-kind=(e.kind) data-xid=[e.xid.as_deref()] {
                            td data-f="kind" { span class=(format!("evkind {}", e.kind.to_ascii_lowercase())) { (e.kind) } }
                            td data-f="time" { span.utc { (utc(e.time)) } }
                            td data-f="db" { (e.database_label().unwrap_or_default()) }
                            td data-f="table" {
                                @if let Some(t) = e.table_label() { (t) }
                                @if let Some(n) = &e.restore_point { (n) }
                            }
                            td data-f="rows" { @if let Some(r) = e.rows { (r) } }
                            td data-f="xid" { @if let Some(x) = &e.xid { code { (x) } } }
                            @if !who.read_only { td.eventactions { (actions(base, who, e)) } }
                        }
                    }
                }
            }
            @if events.is_empty() {
                p.empty #events-empty { "No recovery events match." }
            }
        }
    }
}

/// The buttons of one event and the dialogs they open.
fn actions(base: &str, who: &Signed, e: &Event) -> Markup {
    let key = e.key();
    let action = format!("{base}/restore/event");
    let clone = e.xid.clone().map(|xid| EventRestore::Clone {
        xid,
        lsn: e.before_lsn.clone(),
    });
    let offers = [
        (
            "table",
            "Restore table as it was just before",
            e.table_restore(),
        ),
        (
            "database",
            "Restore database as it was just before",
            e.database_restore(),
        ),
        ("clone", "Clone to just before", clone),
    ];
    html! {
        @for (op, label, restore) in offers {
            @if let Some(r) = restore {
                @let dialog = format!("{key}-{op}");
                button.ghost.small type="button" data-open=(dialog) data-op=(op) { (label) }
                dialog id=(dialog) aria-labelledby=(format!("{dialog}-title")) {
                    form method="post" action=(action) {
                        (layout::csrf(who))
                        input type="hidden" name="op" value=(op);
                        input type="hidden" name="xid" value=(r.xid());
                        @if let Some(lsn) = r.lsn() {
                            input type="hidden" name="lsn" value=(lsn);
                        }
                        h2 id=(format!("{dialog}-title")) { (label) }
                        (dialog_body(&r, &dialog))
                        div.actions {
                            button.ghost type="button" data-close { "Cancel" }
                            button.primary type="submit" data-submit=(op) { "Start" }
                        }
                    }
                }
            }
        }
    }
}

fn dialog_body(r: &EventRestore, id: &str) -> Markup {
    match r {
        EventRestore::Table {
            xid,
            db,
            schema,
            table,
            newname,
        } => html! {
            input type="hidden" name="db" value=(db);
            input type="hidden" name="schema" value=(schema);
            input type="hidden" name="table" value=(table);
            p { "Restores " strong { (schema) "." (table) } " of database " strong { (db) } " as it was just before transaction " code { (xid) } " into this instance, beside the current table." }
            label for=(format!("{id}-newname")) { "Restore as (in schema " (schema) ")" }
            input id=(format!("{id}-newname")) name="newname" value=(newname) required spellcheck="false";
        },
        EventRestore::Database {
            xid, db, newname, ..
        } => html! {
            input type="hidden" name="db" value=(db);
            p { "Restores database " strong { (db) } " as it was just before transaction " code { (xid) } " into this instance under a new name." }
            label for=(format!("{id}-newname")) { "Restore as" }
            input id=(format!("{id}-newname")) name="newname" value=(newname) required spellcheck="false";
        },
        EventRestore::Clone { xid, .. } => html! {
            p { "Creates a new instance from this one as it was just before transaction " code { (xid) } ". The original is not touched." }
        },
    }
}

fn pager(base: &str, q: &EventQuery, total: u64) -> Markup {
    let number = q.page_number();
    let pages = total.div_ceil(PAGE_SIZE).max(1);
    let link = |n: u64| q.link(base, &q.from, &q.to, n);
    html! {
        nav.pager aria-label="Event pages" {
            span.muted { (total) @if total == 1 { " event" } @else { " events" } " · page " (number) " of " (pages) }
            @if number > 1 { a.button.ghost href=(link(number - 1)) rel="prev" { "‹ Previous" } }
            @if number < pages { a.button.ghost href=(link(number + 1)) rel="next" { "Next ›" } }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        parse_api_time(s).unwrap()
    }

    fn delete_event() -> Event {
        Event::from_api(&json!({
            "EventType": "Delete",
            "EventTime": "2026-12-06T12:00:05Z",
            "Xid": "812",
            "DBName": "shop",
            "DBOid": 16390,
            "SchemaName": "public",
            "TableName": "orders",
            "RelFileNode": 16401,
            "Rows": 1500,
            "Lsn": "0/3000028",
        }))
        .unwrap()
    }

    #[test]
    fn events_read_from_the_api_name_what_they_can() {
        let e = delete_event();
        assert_eq!(e.table_label().as_deref(), Some("public.orders"));
        assert_eq!(
            e.summary(),
            "Delete · 2026-12-06 12:00:05 UTC · public.orders · xid 812 · 1500 rows"
        );
        assert_eq!(e.key(), "event-0-3000028-Delete-16401");
        // No name: the file number, and no table restore offered.
        let unnamed = Event::from_api(&json!({
            "EventType": "Truncate", "EventTime": "2026-12-06T12:00:05Z", "Xid": "9",
            "DBName": "16390", "DBOid": 16390, "RelFileNode": 16401, "Lsn": "0/1",
        }))
        .unwrap();
        assert_eq!(unnamed.table_label().as_deref(), Some("relfilenode 16401"));
        assert_eq!(
            unnamed.database_label().as_deref(),
            Some("database OID 16390")
        );
        assert_eq!(unnamed.table_restore(), None);
        assert_eq!(unnamed.database_restore(), None);
    }

    #[test]
    fn restores_stop_just_before_the_transaction() {
        let (action, params) = delete_event().table_restore().unwrap().call("pg-1");
        assert_eq!(action, "RestoreTable");
        let get = |k: &str| params.iter().find(|p| p.0 == k).unwrap().1.clone();
        assert_eq!(get("StrataRestoreTargetXid"), "812");
        assert_eq!(get("StrataRestoreTargetInclusive"), "false");
        let meta: Value = serde_json::from_str(&get("TableMeta")).unwrap();
        assert_eq!(
            meta,
            json!([{"type": "db", "name": "shop", "tables": [
                {"type": "table", "name": "public.orders", "newname": "orders_before_812"}
            ]}])
        );
        let drop = EventRestore::Database {
            xid: "7".into(),
            lsn: Some("0/3000028".into()),
            db: "shop".into(),
            newname: "shop_before_7".into(),
        };
        let (_, params) = drop.call("pg-1");
        assert!(params.contains(&(
            "TableMeta",
            r#"[{"name":"shop","newname":"shop_before_7","type":"db"}]"#.into()
        )));
        // A dropped database is gone before its commit: the LSN before it.
        assert!(params.contains(&("StrataRestoreTargetLsn", "0/3000028".into())));
        assert!(!params.iter().any(|(k, _)| *k == "StrataRestoreTargetXid"));
        let (action, params) = EventRestore::Clone {
            xid: "7".into(),
            lsn: None,
        }
        .call("pg-1");
        assert_eq!(action, "CloneDBInstance");
        assert_eq!(params.len(), 3);
        assert!(params.contains(&("StrataRestoreTargetXid", "7".into())));
    }

    #[test]
    fn forms_become_restores() {
        let form = Fields(
            [
                ("op", "table"),
                ("xid", " 812 "),
                ("db", "shop"),
                ("schema", "public"),
                ("table", "orders"),
                ("newname", "kept"),
            ]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        );
        let r = EventRestore::from_form(&form).unwrap();
        assert_eq!((r.xid(), r.lsn()), ("812", None));
        let db = Fields(
            [
                ("op", "database"),
                ("xid", "9"),
                ("lsn", " 0/3000028 "),
                ("db", "shop"),
                ("newname", "s"),
            ]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        );
        assert_eq!(
            EventRestore::from_form(&db).unwrap().lsn(),
            Some("0/3000028")
        );
        let bad = Fields(vec![("op".into(), "drop".into())]);
        assert_eq!(
            EventRestore::from_form(&bad).unwrap_err().code,
            "InvalidParameter"
        );
    }

    #[test]
    fn default_names_fit_postgresql() {
        assert_eq!(before_name("orders", "812"), "orders_before_812");
        let long = "é".repeat(40);
        let name = before_name(&long, "4294967295");
        assert!(name.len() <= MAX_NAME_BYTES && name.ends_with("_before_4294967295"));
    }

    #[test]
    fn the_strip_zooms_within_the_window() {
        let window = (at("2026-12-06T12:00:00Z"), at("2026-12-06T13:00:00Z"));
        let whole = period(&EventQuery::default(), Some(window)).unwrap();
        assert_eq!(whole, window);
        let z = zooms(whole, Some(window));
        assert_eq!(
            z.zoom_in,
            Some((at("2026-12-06T12:15:00Z"), at("2026-12-06T12:45:00Z")))
        );
        assert_eq!(z.zoom_out, None);
        assert_eq!(z.quarters.len(), 4);
        assert_eq!(z.quarters[3].1, window.1);
        let q = EventQuery {
            from: "2026-12-06T12:15:00Z".into(),
            to: "2026-12-06T12:45:00Z".into(),
            ..Default::default()
        };
        let zoomed = period(&q, Some(window)).unwrap();
        assert_eq!(zooms(zoomed, Some(window)).zoom_out, Some(window));
        assert_eq!(position(at("2026-12-06T12:30:00Z"), zoomed), Some(50.0));
        assert_eq!(position(at("2026-12-06T12:50:00Z"), zoomed), None);
        // Too narrow to zoom further.
        let tiny = (at("2026-12-06T12:00:00Z"), at("2026-12-06T12:00:03Z"));
        let z = zooms(tiny, Some(window));
        assert!(z.zoom_in.is_none() && z.quarters.is_empty());
    }

    #[test]
    fn markers_sit_on_the_strip_with_their_details() {
        let window = (at("2026-12-06T12:00:00Z"), at("2026-12-06T12:00:10Z"));
        let html = timeline(
            "/b",
            &EventQuery::default(),
            window,
            Some(window),
            &[delete_event()],
            1,
        )
        .into_string();
        // Closed SVG elements: a marker inside the line would not be drawn.
        let line = html.find("</line>").unwrap();
        let marker = html.find("<a class=\"marker\"").unwrap();
        assert!(line < marker, "{html}");
        assert!(html.contains(r#"<svg x="50.000%" y="22""#), "{html}");
        assert!(html.contains(r#"data-xid="812""#), "{html}");
    }

    #[test]
    fn periods_end_after_their_last_second() {
        assert_eq!(
            through_second("2026-12-06T12:00:05Z"),
            "2026-12-06T12:00:06Z"
        );
        assert_eq!(through_second("2026-12-06T12:00Z"), "2026-12-06T12:00:01Z");
        assert_eq!(through_second("yesterday"), "yesterday");
    }

    #[test]
    fn zoom_links_keep_the_filters() {
        let q = EventQuery {
            kind: "Delete".into(),
            table: "a&b".into(),
            ..Default::default()
        };
        assert_eq!(
            q.href("/console/instances/pg", None),
            "/console/instances/pg/restore?kind=Delete&table=a%26b&page=1#events"
        );
    }
}
