//! The advanced (sparse) backup policy as `ModifyBackupPolicy` carries it
//! and `DescribeBackupPolicy` returns it: `AdvancedDataPolicies` and
//! `AdvancedLogPolicies`, lists of objects with the SDK's field names. RDS
//! names the fields but documents no values; Strata's values are in the
//! README ("Advanced backup policy"):
//!
//! - `StrategyId`: the rule's id; `regular` is the regular weekly rule
//!   (`PreferredBackupPeriod` and `BackupRetentionPeriod`), first in the
//!   list and never deleted.
//! - `FilterType` `Weekly`/`Monthly`/`Yearly` and `FilterValue`
//!   (`Monday,Friday`; `1,15,Last`; `12-31`).
//! - `RetentionType` `Days` and `RetentionValue` (1 to 3650).
//! - `ActionType`: absent on every entry, the list replaces the rules;
//!   `CREATE`/`UPDATE`/`DELETE` on every entry, each edits one rule.
//!
//! The SDK sends a list flattened (`AdvancedDataPolicies.1.StrategyId`);
//! a JSON array in the plain parameter is taken too.

use std::collections::BTreeMap;

use serde_json::{json, Value};
use strata_catalog::{BackupPolicy, DataRule, REGULAR_RULE_ID};
use strata_service::policy;

use crate::error::{quoted, ApiError, ApiResult};
use crate::params::Params;

/// One object of a list parameter: field name to value.
type Entry = BTreeMap<String, String>;

const DATA_CODE: &str = "InvalidAdvancedDataPolicies.Malformed";
const LOG_CODE: &str = "InvalidAdvancedLogPolicies.Malformed";

fn malformed(code: &str, message: impl Into<String>) -> ApiError {
    ApiError::bad(code, message)
}

/// The objects of list parameter `name`, flattened or as a JSON array;
/// `None` when absent.
fn entries(p: &Params, name: &str, code: &str) -> ApiResult<Option<Vec<Entry>>> {
    if let Some(text) = p.get(name) {
        let list: Vec<BTreeMap<String, Value>> = serde_json::from_str(text).map_err(|_| {
            malformed(
                code,
                format!(
                    "{name} must be a JSON array of objects, got {}",
                    quoted(text)
                ),
            )
        })?;
        let list = list
            .into_iter()
            .map(|obj| {
                obj.into_iter()
                    .map(|(k, v)| match v {
                        Value::String(s) => Ok((k, s)),
                        Value::Number(n) => Ok((k, n.to_string())),
                        Value::Bool(b) => Ok((k, b.to_string())),
                        Value::Null => Ok((k, String::new())),
                        _ => Err(malformed(
                            code,
                            format!("{name}: field {k} must be a string, number or boolean"),
                        )),
                    })
                    .collect::<ApiResult<Entry>>()
            })
            .collect::<ApiResult<Vec<_>>>()?;
        return Ok(Some(list));
    }
    let fields = p.flattened(name);
    if fields.is_empty() {
        return Ok(None);
    }
    let mut by_index: BTreeMap<usize, Entry> = BTreeMap::new();
    for (index, field, value) in fields {
        let i: usize = index
            .parse()
            .ok()
            .filter(|i| (1..=1000).contains(i))
            .ok_or_else(|| {
                malformed(
                    code,
                    format!("{name}.{} is not a list index", quoted(index)),
                )
            })?;
        by_index
            .entry(i)
            .or_default()
            .insert(field.to_string(), value.to_string());
    }
    Ok(Some(by_index.into_values().collect()))
}

/// Refuses fields outside `known`, and RDS fields without a meaning here
/// (`ignored_if_empty`) when they carry a value.
fn check_fields(e: &Entry, known: &[&str], code: &str, what: &str) -> ApiResult<()> {
    for (k, v) in e {
        let empty = v.trim().is_empty() || v.eq_ignore_ascii_case("false");
        if known.contains(&k.as_str()) || (RDS_UNUSED.contains(&k.as_str()) && empty) {
            continue;
        }
        return Err(malformed(
            code,
            format!(
                "{what}: field {} is not supported with a value here",
                quoted(k)
            ),
        ));
    }
    Ok(())
}

/// Fields of RDS's policy objects that have no meaning for Strata (cross-region
/// copies have their own actions): accepted only empty.
const RDS_UNUSED: &[&str] = &[
    "BakType",
    "SrcType",
    "DestType",
    "SrcRegion",
    "DestRegion",
    "FilterKey",
    "OnlyPreserveOneEachDay",
    "OnlyPreserveOneEachHour",
];

fn field<'a>(e: &'a Entry, name: &str) -> Option<&'a str> {
    e.get(name).map(|v| v.trim()).filter(|v| !v.is_empty())
}

fn check_days_type(e: &Entry, type_field: &str, code: &str) -> ApiResult<()> {
    match field(e, type_field) {
        Some(t) if !t.eq_ignore_ascii_case("Days") => Err(malformed(
            code,
            format!("{type_field} must be Days, got {}", quoted(t)),
        )),
        _ => Ok(()),
    }
}

fn days_value(e: &Entry, type_field: &str, value_field: &str, code: &str) -> ApiResult<u32> {
    check_days_type(e, type_field, code)?;
    let v = field(e, value_field).ok_or_else(|| ApiError::missing(value_field))?;
    v.parse().map_err(|_| {
        malformed(
            code,
            format!(
                "{value_field} must be a whole number of days, got {}",
                quoted(v)
            ),
        )
    })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Action {
    Create,
    Update,
    Delete,
}

fn action(e: &Entry) -> ApiResult<Option<Action>> {
    match field(e, "ActionType")
        .map(str::to_ascii_uppercase)
        .as_deref()
    {
        None => Ok(None),
        Some("CREATE") => Ok(Some(Action::Create)),
        Some("UPDATE") | Some("MODIFY") => Ok(Some(Action::Update)),
        Some("DELETE") => Ok(Some(Action::Delete)),
        Some(other) => Err(malformed(
            DATA_CODE,
            format!(
                "ActionType must be CREATE, UPDATE or DELETE, got {}",
                quoted(other)
            ),
        )),
    }
}

/// What `AdvancedDataPolicies` changes: the regular rule's days and
/// retention (strings, checked as `PreferredBackupPeriod` and
/// `BackupRetentionPeriod` are) and the other rules.
#[derive(Default)]
pub struct DataPolicies {
    /// New regular backup days.
    pub regular_days: Option<String>,
    /// New regular retention.
    pub regular_retention: Option<String>,
    /// The rules beyond the regular one, as they will be.
    pub rules: Option<Vec<DataRule>>,
}

/// Reads `AdvancedDataPolicies` against the current policy.
pub fn data_policies(p: &Params, current: &BackupPolicy) -> ApiResult<DataPolicies> {
    let Some(list) = entries(p, "AdvancedDataPolicies", DATA_CODE)? else {
        return Ok(DataPolicies::default());
    };
    let actions = list.iter().map(action).collect::<ApiResult<Vec<_>>>()?;
    let edits = actions.iter().any(Option::is_some);
    if edits && actions.iter().any(Option::is_none) {
        return Err(malformed(
            DATA_CODE,
            "AdvancedDataPolicies: give ActionType on every entry (edits) or on none (the list replaces the rules)",
        ));
    }
    let mut out = DataPolicies::default();
    let mut rules = if edits {
        current.advanced_data_rules.clone()
    } else {
        Vec::new()
    };
    for (e, act) in list.iter().zip(actions) {
        check_fields(
            e,
            &[
                "ActionType",
                "StrategyId",
                "FilterType",
                "FilterValue",
                "RetentionType",
                "RetentionValue",
            ],
            DATA_CODE,
            "AdvancedDataPolicies",
        )?;
        let id = field(e, "StrategyId")
            .ok_or_else(|| ApiError::missing("AdvancedDataPolicies.StrategyId"))?;
        if id == REGULAR_RULE_ID {
            regular_rule(e, act, &mut out)?;
        } else {
            edit_rule(e, id, act, &mut rules)?;
        }
    }
    out.rules = Some(rules);
    Ok(out)
}

/// The regular rule's entry: its days and retention, checked later as
/// `PreferredBackupPeriod` and `BackupRetentionPeriod` are.
fn regular_rule(e: &Entry, act: Option<Action>, out: &mut DataPolicies) -> ApiResult<()> {
    if matches!(act, Some(Action::Delete | Action::Create)) {
        return Err(malformed(
            DATA_CODE,
            "the regular rule is always there: it can be updated, not created or deleted",
        ));
    }
    if field(e, "FilterType").is_some_and(|t| !t.eq_ignore_ascii_case("Weekly")) {
        return Err(malformed(DATA_CODE, "the regular rule is weekly"));
    }
    check_days_type(e, "RetentionType", DATA_CODE)?;
    out.regular_days = field(e, "FilterValue").map(str::to_string);
    out.regular_retention = field(e, "RetentionValue").map(str::to_string);
    Ok(())
}

/// One other rule's entry applied to `rules`: created, updated, deleted, or
/// (without `ActionType`) added to the list that replaces them.
fn edit_rule(e: &Entry, id: &str, act: Option<Action>, rules: &mut Vec<DataRule>) -> ApiResult<()> {
    let existing = rules.iter().position(|r| r.id == id);
    match (act, existing) {
        (Some(Action::Delete), Some(i)) => {
            rules.remove(i);
            return Ok(());
        }
        (Some(Action::Delete | Action::Update), None) => {
            return Err(malformed(
                DATA_CODE,
                format!("no advanced rule has StrategyId {}", quoted(id)),
            ));
        }
        (Some(Action::Create) | None, Some(_)) => {
            return Err(malformed(
                DATA_CODE,
                format!("StrategyId {} is used twice", quoted(id)),
            ));
        }
        _ => {}
    }
    let filter_type = field(e, "FilterType")
        .ok_or_else(|| ApiError::missing("AdvancedDataPolicies.FilterType"))?;
    let filter_value = field(e, "FilterValue")
        .ok_or_else(|| ApiError::missing("AdvancedDataPolicies.FilterValue"))?;
    let rule = DataRule {
        id: id.to_string(),
        kind: policy::parse_rule_kind(filter_type, filter_value)?,
        retention_days: days_value(e, "RetentionType", "RetentionValue", DATA_CODE)?,
    };
    match existing {
        Some(i) => rules[i] = rule,
        None => rules.push(rule),
    }
    Ok(())
}

/// What `AdvancedLogPolicies` changes: the advanced log retention
/// (`Some(None)`: removed) and log backup on or off.
pub struct LogPolicies {
    /// Days WAL is kept under the advanced policy.
    pub retention: Option<Option<u32>>,
    /// `EnableLogBackup`.
    pub enabled: Option<bool>,
}

/// Reads `AdvancedLogPolicies`: at most one entry (Strata keeps one log
/// retention per instance).
pub fn log_policies(p: &Params) -> ApiResult<LogPolicies> {
    let mut out = LogPolicies {
        retention: None,
        enabled: None,
    };
    let Some(list) = entries(p, "AdvancedLogPolicies", LOG_CODE)? else {
        return Ok(out);
    };
    if list.len() > 1 {
        return Err(malformed(
            LOG_CODE,
            "AdvancedLogPolicies holds one entry: an instance has one log retention",
        ));
    }
    for e in &list {
        check_fields(
            e,
            &[
                "ActionType",
                "StrategyId",
                "LogRetentionType",
                "LogRetentionValue",
                "EnableLogBackup",
            ],
            LOG_CODE,
            "AdvancedLogPolicies",
        )?;
        if field(e, "ActionType").is_some_and(|a| a.eq_ignore_ascii_case("DELETE")) {
            out.retention = Some(None);
            continue;
        }
        if field(e, "LogRetentionValue").is_some() {
            out.retention = Some(Some(days_value(
                e,
                "LogRetentionType",
                "LogRetentionValue",
                LOG_CODE,
            )?));
        }
        out.enabled = match field(e, "EnableLogBackup") {
            None => None,
            Some("1") => Some(true),
            Some("0") => Some(false),
            Some(other) => {
                return Err(malformed(
                    LOG_CODE,
                    format!("EnableLogBackup must be 1 or 0, got {}", quoted(other)),
                ))
            }
        };
    }
    Ok(out)
}

/// `DescribeBackupPolicy`'s `AdvancedDataPolicies`: the regular rule first,
/// then the others.
pub fn describe_data(p: &BackupPolicy) -> Value {
    let regular = json!({
        "StrategyId": REGULAR_RULE_ID,
        "FilterType": "Weekly",
        "FilterValue": p.backup_days.join(","),
        "RetentionType": "Days",
        "RetentionValue": p.backup_retention_days,
    });
    let rules = p.advanced_data_rules.iter().map(|r| {
        let (filter_type, filter_value) = policy::rule_filter(&r.kind);
        json!({
            "StrategyId": r.id,
            "FilterType": filter_type,
            "FilterValue": filter_value,
            "RetentionType": "Days",
            "RetentionValue": r.retention_days,
        })
    });
    json!({"AdvancedDataPolicy": std::iter::once(regular).chain(rules).collect::<Vec<_>>()})
}

/// `DescribeBackupPolicy`'s `AdvancedLogPolicies`: the log retention in
/// force.
pub fn describe_log(p: &BackupPolicy) -> Value {
    json!({"AdvancedLogPolicy": [{
        "StrategyId": "log",
        "EnableLogBackup": i32::from(p.log_backup_enabled),
        "LogRetentionType": "Days",
        "LogRetentionValue": p.effective_log_retention_days(),
    }]})
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;

    fn params(pairs: &[(&str, &str)]) -> Params {
        Params::new(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    fn current() -> BackupPolicy {
        let mut p = strata_service::policy::default_policy("a", Utc::now());
        p.advanced_data_rules = vec![DataRule {
            id: "old".into(),
            kind: policy::parse_rule_kind("Weekly", "Sunday").unwrap(),
            retention_days: 30,
        }];
        p
    }

    fn ids(d: &DataPolicies) -> Vec<(String, u32)> {
        d.rules
            .as_ref()
            .unwrap()
            .iter()
            .map(|r| (r.id.clone(), r.retention_days))
            .collect()
    }

    #[test]
    fn flattened_lists_replace_or_edit_the_rules() {
        // Without ActionType the list replaces the rules, in index order.
        let d = data_policies(
            &params(&[
                ("AdvancedDataPolicies.2.StrategyId", "y"),
                ("AdvancedDataPolicies.2.FilterType", "Yearly"),
                ("AdvancedDataPolicies.2.FilterValue", "12-31"),
                ("AdvancedDataPolicies.2.RetentionValue", "3650"),
                ("AdvancedDataPolicies.1.StrategyId", "regular"),
                ("AdvancedDataPolicies.1.FilterValue", "Monday,Friday"),
                ("AdvancedDataPolicies.1.RetentionValue", "30"),
            ]),
            &current(),
        )
        .unwrap();
        assert_eq!(ids(&d), [("y".to_string(), 3650)]);
        assert_eq!(d.regular_days.as_deref(), Some("Monday,Friday"));
        assert_eq!(d.regular_retention.as_deref(), Some("30"));
        // With ActionType each entry edits one rule.
        let d = data_policies(
            &params(&[(
                "AdvancedDataPolicies",
                r#"[{"ActionType":"CREATE","StrategyId":"m","FilterType":"Monthly","FilterValue":"Last","RetentionValue":365},
                    {"ActionType":"UPDATE","StrategyId":"old","FilterType":"Weekly","FilterValue":"Saturday","RetentionValue":60}]"#,
            )]),
            &current(),
        )
        .unwrap();
        assert_eq!(ids(&d), [("old".to_string(), 60), ("m".to_string(), 365)]);
        let d = data_policies(
            &params(&[
                ("AdvancedDataPolicies.1.ActionType", "DELETE"),
                ("AdvancedDataPolicies.1.StrategyId", "old"),
            ]),
            &current(),
        )
        .unwrap();
        assert_eq!(ids(&d), []);
        // Absent: nothing changes.
        assert!(data_policies(&params(&[]), &current())
            .unwrap()
            .rules
            .is_none());
    }

    #[test]
    fn malformed_lists_are_refused() {
        for pairs in [
            vec![("AdvancedDataPolicies", "{}")],
            vec![("AdvancedDataPolicies.0.StrategyId", "x")],
            vec![("AdvancedDataPolicies.1.Color", "blue")],
            vec![
                ("AdvancedDataPolicies.1.StrategyId", "old"),
                ("AdvancedDataPolicies.1.ActionType", "CREATE"),
            ],
            vec![
                ("AdvancedDataPolicies.1.StrategyId", "regular"),
                ("AdvancedDataPolicies.1.FilterType", "Monthly"),
            ],
        ] {
            let e = data_policies(&params(&pairs), &current())
                .err()
                .unwrap_or_else(|| panic!("{pairs:?} accepted"));
            assert_eq!(e.code, DATA_CODE, "{pairs:?}");
        }
        let e = log_policies(&params(&[
            ("AdvancedLogPolicies.1.LogRetentionValue", "7"),
            ("AdvancedLogPolicies.2.LogRetentionValue", "8"),
        ]))
        .err()
        .unwrap();
        assert_eq!(e.code, LOG_CODE);
    }

    #[test]
    fn the_answer_goes_back_unchanged() {
        let p = current();
        let answer = describe_data(&p);
        let list = serde_json::to_string(&answer["AdvancedDataPolicy"]).unwrap();
        let d = data_policies(&params(&[("AdvancedDataPolicies", &list)]), &p).unwrap();
        assert_eq!(d.rules.unwrap(), p.advanced_data_rules);
        assert_eq!(d.regular_days.unwrap(), p.backup_days.join(","));
    }
}
