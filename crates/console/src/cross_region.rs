//! An instance's Cross-Region Backup tab: its cross-region backup policy
//! (`DescribeInstanceCrossBackupPolicy`, changed with
//! `ModifyInstanceCrossBackupPolicy`) and the copies of its backup sets in
//! the target regions (`DescribeCrossRegionBackups`), read and changed
//! through the API's actions.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use axum::Form;
use maud::{html, Markup};
use serde_json::{Map, Value};
use strata_api::ApiError;
use strata_catalog::Instance;

use crate::instance::{base, load, missing, render, Tab};
use crate::layout::{self, api_time, bytes};
use crate::session::{Flash, Signed};
use crate::{csrf_ok, csrf_refused, ConsoleState, Fields, Page};

/// The policy form's values, as stored or as submitted.
#[derive(Debug, Clone, Default, PartialEq)]
struct CrossForm {
    region: String,
    backup_on: bool,
    log_on: bool,
    retention: String,
}

impl CrossForm {
    fn of(answer: &Map<String, Value>) -> CrossForm {
        let text = |k: &str| match answer.get(k) {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            _ => String::new(),
        };
        CrossForm {
            region: text("CrossBackupRegion"),
            backup_on: text("BackupEnabled") == "Enable",
            log_on: text("LogBackupEnabled") == "Enable",
            retention: text("Retention"),
        }
    }

    fn from_form(f: &Fields) -> CrossForm {
        CrossForm {
            region: f.get("region").trim().to_string(),
            backup_on: f.get("backup") == "on",
            log_on: f.get("log") == "on",
            retention: f.get("retention").trim().to_string(),
        }
    }

    /// `ModifyInstanceCrossBackupPolicy`'s parameters; the API checks them.
    fn params(&self, instance_id: &str) -> Vec<(&'static str, String)> {
        let enable = |on: bool| if on { "Enable" } else { "Disable" }.to_string();
        let mut params = vec![
            ("DBInstanceId", instance_id.to_string()),
            ("BackupEnabled", enable(self.backup_on)),
            ("LogBackupEnabled", enable(self.log_on)),
            ("Retention", self.retention.clone()),
        ];
        if !self.region.is_empty() {
            params.push(("CrossBackupRegion", self.region.clone()));
        }
        params
    }
}

/// Which field of the form an API error belongs under ("" for above it).
fn error_field(code: &str) -> &'static str {
    match code {
        "InvalidRetention.Malformed" => "retention",
        c if c.starts_with("InvalidCrossBackupRegion") || c == "MissingParameter" => "region",
        c if c.starts_with("InvalidRegion") => "region",
        _ => "",
    }
}

/// `GET /console/instances/{id}/cross-region`.
pub async fn page(
    State(state): State<Arc<ConsoleState>>,
    Path(id): Path<String>,
    page: Page,
) -> Response {
    let inst = match load(&state, &id) {
        Ok(i) => i,
        Err(e) => return missing(&page, e),
    };
    let params = vec![("DBInstanceId", inst.id.to_string())];
    let body = match state
        .call(&page.who, "DescribeInstanceCrossBackupPolicy", params)
        .await
    {
        Ok(answer) => tab(&state, &page.who, &inst, &CrossForm::of(&answer), None).await,
        Err(e) => layout::error_box("The cross-region policy could not be read:", &e),
    };
    render(&state, page, &inst, Tab::CrossRegion, StatusCode::OK, body)
}

/// `POST /console/instances/{id}/cross-region`: `ModifyInstanceCrossBackupPolicy`;
/// on a refusal the tab again with the values kept and the API's error.
pub async fn save(
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
    let values = CrossForm::from_form(&form);
    let answer = state
        .call(
            &page.who,
            "ModifyInstanceCrossBackupPolicy",
            values.params(&inst.id),
        )
        .await;
    match answer {
        Ok(_) => {
            state.flash(
                &page.who,
                Flash::Done {
                    text: format!("Cross-region backup policy of {} saved.", inst.id),
                    link: None,
                },
            );
            Redirect::to(&format!("{}/cross-region", base(&inst.id))).into_response()
        }
        Err(e) => {
            let status = e.status;
            let body = tab(&state, &page.who, &inst, &values, Some(&e)).await;
            render(&state, page, &inst, Tab::CrossRegion, status, body)
        }
    }
}

async fn tab(
    state: &ConsoleState,
    who: &Signed,
    inst: &Instance,
    values: &CrossForm,
    error: Option<&ApiError>,
) -> Markup {
    let regions = state.service.regions().available();
    let copies = state
        .call(
            who,
            "DescribeCrossRegionBackups",
            vec![
                ("DBInstanceId", inst.id.to_string()),
                ("PageSize", "100".into()),
            ],
        )
        .await;
    html! {
        (policy_form(who, inst, values, &regions, error))
        h2 { "Copies in other regions" }
        @match &copies {
            Ok(answer) => { (copy_list(answer)) }
            Err(e) => { (layout::error_box("The copies could not be listed:", e)) }
        }
    }
}

fn policy_form(
    who: &Signed,
    inst: &Instance,
    v: &CrossForm,
    regions: &[String],
    error: Option<&ApiError>,
) -> Markup {
    let ro = who.read_only;
    let under = |field: &str| error.filter(|e| error_field(&e.code) == field);
    let field_error = |field: &str| {
        html! {
            @if let Some(e) = under(field) {
                p.fielderror role="alert" id=(format!("cross-{field}-error")) { (e.message) " " span.code { (e.code) } }
            }
        }
    };
    html! {
        @if let Some(e) = error.filter(|e| error_field(&e.code).is_empty()) {
            (layout::error_box("The policy was not saved:", e))
        }
        @if regions.is_empty() {
            p.notice.info #cross-no-regions {
                "No cross-region target is configured: add a " code { "[regions.<id>]" }
                " table (its repository) to the configuration to copy backups to another region."
            }
        }
        form #cross-form method="post" action=(format!("{}/cross-region", base(&inst.id))) novalidate {
            (layout::csrf(who))
            fieldset.card disabled[ro] {
                legend { "Cross-Region Backup" }
                p.hint { "Backup sets that finish after copying is turned on are copied to the target region's repository, with their WAL when log copies are on." }
                label.check {
                    input #cross-backup type="checkbox" name="backup" value="on" checked[v.backup_on];
                    span { "Copy backup sets to another region" }
                }
                div.field {
                    label for="cross-region" { "Target Region" }
                    select #cross-region name="region" aria-invalid=[under("region").map(|_| "true")] {
                        @if v.region.is_empty() { option value="" selected { "— choose —" } }
                        @for r in regions {
                            option value=(r) selected[*r == v.region] { (r) }
                        }
                        @if !v.region.is_empty() && !regions.contains(&v.region) {
                            option value=(v.region) selected { (v.region) " (not configured)" }
                        }
                    }
                    (field_error("region"))
                }
                div.field {
                    label for="cross-retention" { "Retention (days)" }
                    input #cross-retention name="retention" inputmode="numeric" value=(v.retention)
                        aria-invalid=[under("retention").map(|_| "true")];
                    p.hint { "7 to 1825 days." }
                    (field_error("retention"))
                }
                label.check {
                    input #cross-log type="checkbox" name="log" value="on" checked[v.log_on];
                    span { "Copy log backups (WAL) too, for point-in-time restores from the copies" }
                }
                @if !ro {
                    div.formactions { button.primary type="submit" #cross-submit { "Save" } }
                }
            }
        }
    }
}

fn copy_list(answer: &Map<String, Value>) -> Markup {
    let rows: Vec<&Value> = answer
        .get("Items")
        .and_then(|l| l.get("Item"))
        .and_then(Value::as_array)
        .map(|a| a.iter().collect())
        .unwrap_or_default();
    let text = |item: &Value, key: &str| -> String {
        match item.get(key) {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            _ => String::new(),
        }
    };
    html! {
        div.card.tablewrap {
            table.data.sortable #cross-copies {
                thead { tr {
                    (layout::sort_th("Copy ID", "num"))
                    (layout::sort_th("Backup Set ID", "text"))
                    (layout::sort_th("Region", "text"))
                    (layout::sort_th("Start Time", "num"))
                    (layout::sort_th("End Time", "num"))
                    (layout::sort_th("Size", "num"))
                    (layout::sort_th("Copied", "num"))
                } }
                tbody {
                    @for c in &rows {
                        @let size = c.get("CrossBackupSetSize").and_then(Value::as_u64).unwrap_or(0);
                        tr data-copy=(text(c, "CrossBackupId")) {
                            td data-v=(text(c, "CrossBackupId")) { (text(c, "CrossBackupId")) }
                            td data-v=(text(c, "StrataBackupId")) { code { (text(c, "StrataBackupId")) } }
                            td { (text(c, "CrossBackupRegion")) }
                            td data-v=(layout::sort_time(layout::parse_api_time(&text(c, "BackupStartTime")))) { (api_time(&text(c, "BackupStartTime"))) }
                            td data-v=(layout::sort_time(layout::parse_api_time(&text(c, "BackupEndTime")))) { (api_time(&text(c, "BackupEndTime"))) }
                            td data-v=(size) { (bytes(size)) }
                            td data-v=(layout::sort_time(layout::parse_api_time(&text(c, "StrataCopyTime")))) { (api_time(&text(c, "StrataCopyTime"))) }
                        }
                    }
                }
            }
            @if rows.is_empty() {
                p.empty { "No copies in other regions." }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_form_becomes_the_api_parameters() {
        let f = Fields(vec![
            ("region".into(), " eu-copy ".into()),
            ("backup".into(), "on".into()),
            ("retention".into(), "30".into()),
        ]);
        let v = CrossForm::from_form(&f);
        assert_eq!(
            v.params("pg-1"),
            vec![
                ("DBInstanceId", "pg-1".to_string()),
                ("BackupEnabled", "Enable".to_string()),
                ("LogBackupEnabled", "Disable".to_string()),
                ("Retention", "30".to_string()),
                ("CrossBackupRegion", "eu-copy".to_string()),
            ]
        );
        // No region chosen: the API decides (it keeps the stored one, or refuses).
        let off = CrossForm::from_form(&Fields(vec![]));
        assert!(!off
            .params("pg-1")
            .iter()
            .any(|(k, _)| *k == "CrossBackupRegion"));
    }

    #[test]
    fn errors_land_under_their_fields() {
        assert_eq!(error_field("InvalidRetention.Malformed"), "retention");
        assert_eq!(error_field("MissingParameter"), "region");
        assert_eq!(error_field("InvalidParameterCombination"), "");
    }
}
