//! Backup policies as RDS defines them: the days of the week and the daily
//! one-hour window for automatic data backups, data retention 7–730 days, log
//! backup on or off, log retention 7–7300 days and never above data
//! retention. Parsing, validation (refusing with a [`Refusal`] kind the API
//! maps to RDS's error code), defaults and the schedule arithmetic live here
//! as pure functions.

use chrono::{DateTime, Datelike, Duration, NaiveDate, NaiveTime, TimeZone, Utc, Weekday};
use strata_catalog::{
    ArchiveKeepPolicy, BackupMethod, BackupPolicy, DataRule, KeepUntil, MonthDay, RuleKind,
    BACKUP_INTERVALS_MINUTES, REGULAR_RULE_ID,
};

/// Weekday names as RDS spells them.
pub const WEEKDAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

/// Days data backups may be kept.
pub const DATA_RETENTION_DAYS: std::ops::RangeInclusive<u32> = 7..=730;
/// Days WAL may be kept.
pub const LOG_RETENTION_DAYS: std::ops::RangeInclusive<u32> = 7..=7300;
/// Retention of a new instance, in days.
pub const DEFAULT_RETENTION_DAYS: u32 = 7;

/// What a refused request got wrong; the API layer maps each to its
/// RDS error code and HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// `PreferredBackupPeriod` is not a list of at least two days of the week.
    BackupDaysMalformed,
    /// `PreferredBackupTime` is not a one-hour UTC window.
    BackupWindowMalformed,
    /// A data retention period is not a number of days in range.
    DataRetentionMalformed,
    /// A log retention period is not a number of days in range.
    LogRetentionMalformed,
    /// Parameters that each make sense do not make sense together.
    ConflictingParameters,
    /// A parameter the request needs in this combination is absent.
    MissingParameter,
    /// A cross-region copy retention is out of range.
    CopyRetentionMalformed,
    /// The named region is not a cross-region target of this service.
    UnknownRegion,
    /// No cross-region copy has that id (in that region).
    CopyNotFound,
    /// A restore to a point in time where no log backup covers any time.
    NoLogBackup,
    /// A restore time outside the recoverable window.
    RestoreTimeOutsideWindow,
    /// The backup set must be kept (newest successful one, or in use).
    BackupSetKept,
    /// The operation is for instances Strata created, and this one was registered.
    NotCreatedByStrata,
    /// `TableMeta` is not a well-formed list of databases and tables.
    TableMetaMalformed,
    /// `DbNames` is not a list of names nor an object of new names.
    DbNamesMalformed,
    /// A database name cannot be used (length, control characters).
    DatabaseNameFormat,
    /// A new database name is given twice or already exists.
    DatabaseNameTaken,
    /// A named database does not exist where the restore needs it.
    DatabaseNotFound,
    /// A schema or table name cannot be used.
    TableNameFormat,
    /// A new table name is given twice or already exists.
    TableNameTaken,
    /// A named table does not exist at the restore point.
    TableNotFound,
    /// Snapshot backups asked of an instance without an agent.
    SnapshotNeedsAgent,
    /// `BackupInterval` is not one of the intervals offered.
    BackupIntervalMalformed,
    /// `BackupInterval` asked of a policy whose backups are not snapshots.
    BackupIntervalNeedsSnapshot,
    /// An advanced (sparse) policy rule is malformed.
    AdvancedPolicyMalformed,
    /// Archived backups (retention, keep policy or count) are malformed.
    ArchivePolicyMalformed,
    /// The count of last sets to keep is out of range.
    KeepLastMalformed,
    /// A keep by hand is malformed (a time in the past, a bad note).
    KeepMalformed,
    /// A new expiry of a backup set in the past or before its current one.
    ExpireTimeTooEarly,
    /// A backup set that is not (or not yet) a successful one.
    BackupSetNotSuccessful,
    /// The backup set has no list of its databases and tables (not in the
    /// repository, or taken before lists were recorded).
    NoContents,
    /// Imports over the API are off (no import directory is configured).
    ImportDisabled,
    /// An import's file name is not one name under the import directory.
    ImportFileMalformed,
    /// No directory of that name is in the import directory.
    ImportFileNotFound,
    /// No user backup has that id.
    UserBackupNotFound,
    /// A user backup's comment is too long or holds control characters.
    CommentMalformed,
    /// A user backup's retention is not a number of days in range.
    UserBackupRetentionMalformed,
    /// `EngineVersion` is not a PostgreSQL major version.
    EngineVersionMalformed,
}

/// A request that breaks a policy rule: what it got wrong and a message for
/// people (the API answers it as is).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct PolicyError {
    /// Which rule the request breaks.
    pub kind: Refusal,
    /// What is wrong, for people.
    pub message: String,
}

/// A refusal of `kind`, as the error type the caller returns (a
/// [`PolicyError`] or a [`crate::ServiceError`]).
pub(crate) fn invalid<E: From<PolicyError>>(kind: Refusal, message: impl Into<String>) -> E {
    PolicyError {
        kind,
        message: message.into(),
    }
    .into()
}

/// Parses `PreferredBackupPeriod` ("Monday,Thursday"): known day names, at
/// least two distinct ones; returned in week order.
pub fn parse_days(s: &str) -> Result<Vec<String>, PolicyError> {
    let mut days = [false; 7];
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let Some(i) = WEEKDAYS.iter().position(|d| d.eq_ignore_ascii_case(part)) else {
            return Err(invalid(
                Refusal::BackupDaysMalformed,
                format!(
                    "PreferredBackupPeriod: {part:?} is not a day of the week (Monday … Sunday)"
                ),
            ));
        };
        days[i] = true;
    }
    let chosen: Vec<String> = WEEKDAYS
        .iter()
        .zip(days)
        .filter(|(_, on)| *on)
        .map(|(d, _)| d.to_string())
        .collect();
    if chosen.len() < 2 {
        return Err(invalid(
            Refusal::BackupDaysMalformed,
            "PreferredBackupPeriod must name at least two days of the week, so a backup runs at least twice a week",
        ));
    }
    Ok(chosen)
}

/// Parses `PreferredBackupTime` (`HH:mmZ-HH:mmZ`, UTC, exactly one hour,
/// may wrap past midnight); returns the window's start time of day.
pub fn parse_window(s: &str) -> Result<NaiveTime, PolicyError> {
    let bad = || {
        invalid(
            Refusal::BackupWindowMalformed,
            format!("PreferredBackupTime {s:?} must be a one-hour UTC window written HH:mmZ-HH:mmZ, e.g. 02:00Z-03:00Z"),
        )
    };
    let (a, b) = s.trim().split_once('-').ok_or_else(bad)?;
    let parse = |t: &str| {
        let t = t.strip_suffix('Z').ok_or_else(bad)?;
        if t.len() != 5 {
            return Err(bad());
        }
        NaiveTime::parse_from_str(t, "%H:%M").map_err(|_| bad())
    };
    let (start, end) = (parse(a)?, parse(b)?);
    if start + Duration::hours(1) != end {
        return Err(bad());
    }
    Ok(start)
}

/// Checks a data retention period against RDS's range.
pub fn check_data_retention(days: u32) -> Result<u32, PolicyError> {
    if DATA_RETENTION_DAYS.contains(&days) {
        Ok(days)
    } else {
        Err(invalid(
            Refusal::DataRetentionMalformed,
            format!("BackupRetentionPeriod must be 7 to 730 days, got {days}"),
        ))
    }
}

/// Checks a log retention period: in range and no longer than the data's.
pub fn check_log_retention(days: u32, data_days: u32) -> Result<u32, PolicyError> {
    if !LOG_RETENTION_DAYS.contains(&days) {
        return Err(invalid(
            Refusal::LogRetentionMalformed,
            format!("LogBackupRetentionPeriod must be 7 to 7300 days, got {days}"),
        ));
    }
    if days > data_days {
        return Err(invalid(
            Refusal::ConflictingParameters,
            format!("LogBackupRetentionPeriod ({days}) cannot exceed BackupRetentionPeriod ({data_days})"),
        ));
    }
    Ok(days)
}

/// Days an advanced rule's sets may be kept.
pub const RULE_RETENTION_DAYS: std::ops::RangeInclusive<u32> = 1..=3650;
/// Days archived sets may be kept (0 turns archiving off).
pub const ARCHIVE_RETENTION_DAYS: std::ops::RangeInclusive<u32> = 30..=1095;
/// Rules an advanced policy may have beside the regular one.
pub const MAX_ADVANCED_RULES: usize = 32;
/// Count-based retention: how many last sets may be asked for.
pub const KEEP_LAST: std::ops::RangeInclusive<u32> = 1..=1000;
/// Longest note on a kept set, in characters.
pub const KEEP_NOTE_CHARS: usize = 256;

/// Checks `BackupInterval`: one of the intervals offered, and only for a
/// policy whose automatic backups are snapshots (RDS's `Category=Flash`),
/// since a physical backup every 15 minutes would never finish.
pub fn check_backup_interval(
    minutes: Option<u32>,
    method: BackupMethod,
) -> Result<Option<u32>, PolicyError> {
    let Some(m) = minutes else {
        return Ok(None);
    };
    if !BACKUP_INTERVALS_MINUTES.contains(&m) {
        return Err(invalid(
            Refusal::BackupIntervalMalformed,
            format!("BackupInterval must be one of 15, 30, 60, 120, 180, 240, 360, 480 or 720 minutes, got {m}"),
        ));
    }
    if method != BackupMethod::Snapshot {
        return Err(invalid(
            Refusal::BackupIntervalNeedsSnapshot,
            "BackupInterval needs snapshot backups (Category=Flash): high-frequency backups are snapshots",
        ));
    }
    Ok(Some(m))
}

fn bad_rule(message: String) -> PolicyError {
    invalid(Refusal::AdvancedPolicyMalformed, message)
}

/// Checks one advanced rule: its id (1–64 letters, digits, `-`, `_`, not
/// the regular rule's), its days and its retention.
pub fn check_data_rule(rule: &DataRule) -> Result<(), PolicyError> {
    let id = &rule.id;
    let id_ok = !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if !id_ok {
        return Err(bad_rule(format!(
            "rule id {id:?} must be 1 to 64 letters, digits, '-' or '_'"
        )));
    }
    if id == REGULAR_RULE_ID {
        return Err(bad_rule(format!(
            "rule id {id:?} is the regular rule's (the backup days and BackupRetentionPeriod)"
        )));
    }
    if !RULE_RETENTION_DAYS.contains(&rule.retention_days) {
        return Err(bad_rule(format!(
            "rule {id}: retention must be 1 to 3650 days, got {}",
            rule.retention_days
        )));
    }
    match &rule.kind {
        RuleKind::Weekly { days } => {
            if days.is_empty() || has_duplicates(days) {
                return Err(bad_rule(format!(
                    "rule {id}: a weekly rule names one or more distinct days of the week"
                )));
            }
        }
        RuleKind::Monthly { days } => {
            if days.is_empty() || has_duplicates(days) {
                return Err(bad_rule(format!(
                    "rule {id}: a monthly rule names one or more distinct days of the month (1 to 31 or Last)"
                )));
            }
            if let Some(d) = days
                .iter()
                .find(|d| matches!(d, strata_catalog::MonthDay::Day(n) if !(1..=31).contains(n)))
            {
                return Err(bad_rule(format!(
                    "rule {id}: {d} is not a day of the month"
                )));
            }
        }
        RuleKind::Yearly { month, day } => {
            // 2024 is a leap year: 29 February is a date, taken in leap years.
            if NaiveDate::from_ymd_opt(2024, *month, *day).is_none() {
                return Err(bad_rule(format!(
                    "rule {id}: month {month} day {day} is not a date"
                )));
            }
        }
    }
    Ok(())
}

fn has_duplicates<T: PartialEq>(items: &[T]) -> bool {
    items
        .iter()
        .enumerate()
        .any(|(i, a)| items[..i].contains(a))
}

/// Checks an advanced policy's rules: each one, ids unique, at most
/// [`MAX_ADVANCED_RULES`].
pub fn check_data_rules(rules: &[DataRule]) -> Result<(), PolicyError> {
    if rules.len() > MAX_ADVANCED_RULES {
        return Err(bad_rule(format!(
            "an advanced policy has at most {MAX_ADVANCED_RULES} rules besides the regular one, got {}",
            rules.len()
        )));
    }
    for (i, r) in rules.iter().enumerate() {
        check_data_rule(r)?;
        if rules[..i].iter().any(|o| o.id == r.id) {
            return Err(bad_rule(format!("rule id {:?} is used twice", r.id)));
        }
    }
    Ok(())
}

/// Checks archived backups: retention 0 (off) or 30–1095 days, and a keep
/// count of 1–31 by month or 1–7 by week (any with `KeepAll`).
pub fn check_archive(
    retention_days: u32,
    keep: ArchiveKeepPolicy,
    count: u32,
) -> Result<(), PolicyError> {
    if retention_days != 0 && !ARCHIVE_RETENTION_DAYS.contains(&retention_days) {
        return Err(invalid(
            Refusal::ArchivePolicyMalformed,
            format!("ArchiveBackupRetentionPeriod must be 0 (off) or 30 to 1095 days, got {retention_days}"),
        ));
    }
    let range = match keep {
        ArchiveKeepPolicy::ByMonth => 1..=31,
        ArchiveKeepPolicy::ByWeek => 1..=7,
        ArchiveKeepPolicy::KeepAll => return Ok(()),
    };
    if !range.contains(&count) {
        return Err(invalid(
            Refusal::ArchivePolicyMalformed,
            format!(
                "ArchiveBackupKeepCount must be {} to {} with ArchiveBackupKeepPolicy {keep}, got {count}",
                range.start(),
                range.end()
            ),
        ));
    }
    Ok(())
}

/// Checks count-based retention: off, or 1–1000 last sets.
pub fn check_keep_last(keep_last: Option<u32>) -> Result<Option<u32>, PolicyError> {
    match keep_last {
        Some(n) if !KEEP_LAST.contains(&n) => Err(invalid(
            Refusal::KeepLastMalformed,
            format!("the count of last sets to keep must be 1 to 1000, got {n}"),
        )),
        other => Ok(other),
    }
}

/// Checks a keep by hand at `now`: a time in the future, and a note of at
/// most [`KEEP_NOTE_CHARS`] characters without control characters.
pub fn check_keep(
    until: KeepUntil,
    note: Option<&str>,
    now: DateTime<Utc>,
) -> Result<(), PolicyError> {
    if let KeepUntil::Until(t) = until {
        if t <= now {
            return Err(invalid(
                Refusal::KeepMalformed,
                format!("a set can only be kept until a time to come, not {t}"),
            ));
        }
    }
    if let Some(note) = note {
        if note.chars().count() > KEEP_NOTE_CHARS || note.chars().any(char::is_control) {
            return Err(invalid(
                Refusal::KeepMalformed,
                format!("a keep note is at most {KEEP_NOTE_CHARS} characters without control characters"),
            ));
        }
    }
    Ok(())
}

/// Checks the retention options of a whole policy (what
/// `ModifyBackupPolicy` composed): interval, advanced rules and log
/// retention, archive, count.
pub fn check_retention_options(p: &BackupPolicy) -> Result<(), PolicyError> {
    check_backup_interval(p.backup_interval_minutes, p.backup_method)?;
    check_data_rules(&p.advanced_data_rules)?;
    if let Some(days) = p.advanced_log_retention_days {
        if !LOG_RETENTION_DAYS.contains(&days) {
            return Err(invalid(
                Refusal::LogRetentionMalformed,
                format!("the advanced log retention must be 7 to 7300 days, got {days}"),
            ));
        }
    }
    check_archive(
        p.archive_retention_days,
        p.archive_keep_policy,
        p.archive_keep_count,
    )?;
    check_keep_last(p.keep_last)?;
    Ok(())
}

/// A retention value as it arrives on the API (a string); `kind` says which
/// retention it is, `name` the parameter.
pub fn parse_days_count(value: &str, kind: Refusal, name: &str) -> Result<u32, PolicyError> {
    value.trim().parse().map_err(|_| {
        invalid(
            kind,
            format!("{name} must be a whole number of days, got {value:?}"),
        )
    })
}

/// Parses an advanced rule's schedule as the API carries it (`FilterType`,
/// `FilterValue`): `Weekly` with day names (`Monday,Friday`), `Monthly`
/// with days of the month (`1,15,Last`), `Yearly` with a date (`MM-DD`).
/// The days are returned in order; [`check_data_rule`] judges the rest.
pub fn parse_rule_kind(filter_type: &str, filter_value: &str) -> Result<RuleKind, PolicyError> {
    let parts = || {
        filter_value
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
    };
    match filter_type.trim().to_ascii_lowercase().as_str() {
        "weekly" => {
            let mut days = Vec::new();
            for part in parts() {
                let Some(i) = WEEKDAYS.iter().position(|d| d.eq_ignore_ascii_case(part)) else {
                    return Err(bad_rule(format!(
                        "FilterValue {part:?} is not a day of the week (Monday … Sunday)"
                    )));
                };
                days.push(i);
            }
            days.sort();
            Ok(RuleKind::Weekly {
                days: days
                    .into_iter()
                    .filter_map(|i| Weekday::try_from(i as u8).ok())
                    .collect(),
            })
        }
        "monthly" => {
            let mut days = parts()
                .map(|p| {
                    p.parse::<MonthDay>().map_err(|_| {
                        bad_rule(format!(
                            "FilterValue {p:?} is not a day of the month (1 to 31 or Last)"
                        ))
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            days.sort();
            Ok(RuleKind::Monthly { days })
        }
        "yearly" => {
            let bad = || {
                bad_rule(format!(
                    "FilterValue {filter_value:?} of a yearly rule must be a date MM-DD, e.g. 12-31"
                ))
            };
            let (m, d) = filter_value.trim().split_once('-').ok_or_else(bad)?;
            let month = m.parse().map_err(|_| bad())?;
            let day = d.parse().map_err(|_| bad())?;
            Ok(RuleKind::Yearly { month, day })
        }
        _ => Err(bad_rule(format!(
            "FilterType must be Weekly, Monthly or Yearly, got {filter_type:?}"
        ))),
    }
}

/// An advanced rule's schedule as the API carries it: `FilterType` and
/// `FilterValue` (the inverse of [`parse_rule_kind`]).
pub fn rule_filter(kind: &RuleKind) -> (&'static str, String) {
    match kind {
        RuleKind::Weekly { days } => (
            "Weekly",
            days.iter()
                .map(|d| weekday_name(*d))
                .collect::<Vec<_>>()
                .join(","),
        ),
        RuleKind::Monthly { days } => (
            "Monthly",
            days.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(","),
        ),
        RuleKind::Yearly { month, day } => ("Yearly", format!("{month:02}-{day:02}")),
    }
}

/// The policy a newly registered instance gets: log backup on, 7-day
/// retentions, two backup days three or four days apart and a one-hour
/// window, both derived from the instance id so instances spread out.
pub fn default_policy(instance_id: &str, now: DateTime<Utc>) -> BackupPolicy {
    let h = instance_id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    });
    let first = (h % 7) as usize;
    let second = (first + 3 + (h >> 8) as usize % 2) % 7;
    let mut days = vec![first, second];
    days.sort();
    let hour = (h >> 16) % 24;
    BackupPolicy {
        instance_id: instance_id.into(),
        backup_days: days.into_iter().map(|d| WEEKDAYS[d].to_string()).collect(),
        backup_window: format!("{:02}:00Z-{:02}:00Z", hour, (hour + 1) % 24),
        backup_retention_days: DEFAULT_RETENTION_DAYS,
        log_backup_enabled: true,
        log_retention_days: DEFAULT_RETENTION_DAYS,
        updated_at: now,
        last_auto_slot: None,
        backup_method: BackupMethod::Physical,
        backup_interval_minutes: None,
        advanced_enabled: false,
        advanced_data_rules: Vec::new(),
        advanced_log_retention_days: None,
        archive_retention_days: 0,
        archive_keep_policy: ArchiveKeepPolicy::ByMonth,
        archive_keep_count: 1,
        keep_last: None,
    }
}

fn weekday_name(d: Weekday) -> &'static str {
    WEEKDAYS[d.num_days_from_monday() as usize]
}

/// Whether `policy` takes a backup on `day`: a regular backup day, or with
/// the advanced policy on, a day one of its rules falls on.
fn is_backup_day(policy: &BackupPolicy, day: NaiveDate) -> bool {
    policy
        .backup_days
        .iter()
        .any(|b| b == weekday_name(day.weekday()))
        || (policy.advanced_enabled
            && policy
                .advanced_data_rules
                .iter()
                .any(|r| r.kind.falls_on(day)))
}

/// The minutes between high-frequency snapshots, when the policy takes them
/// (they are snapshots: with any other method the interval is ignored).
fn snapshot_interval(policy: &BackupPolicy) -> Option<u32> {
    policy
        .backup_interval_minutes
        .filter(|m| *m > 0 && policy.backup_method == BackupMethod::Snapshot)
}

/// Backup starts of `policy` from the day before `around` minus `back`
/// days to `forward` days after, in order: the window start on each backup
/// day, and on the regular backup days one every `BackupInterval` from
/// midnight UTC.
fn slots(
    policy: &BackupPolicy,
    around: DateTime<Utc>,
    back: i64,
    forward: i64,
) -> Vec<DateTime<Utc>> {
    let Ok(start) = parse_window(&policy.backup_window) else {
        return Vec::new();
    };
    let interval = snapshot_interval(policy);
    let today = around.date_naive();
    let mut starts = Vec::new();
    for day in (-back..=forward).map(|d| today + Duration::days(d)) {
        if !is_backup_day(policy, day) {
            continue;
        }
        starts.push(Utc.from_utc_datetime(&day.and_time(start)));
        let regular = policy
            .backup_days
            .iter()
            .any(|b| b == weekday_name(day.weekday()));
        if let (Some(minutes), true) = (interval, regular) {
            let midnight = Utc.from_utc_datetime(&day.and_time(NaiveTime::MIN));
            starts.extend(
                (0..24 * 60 / i64::from(minutes))
                    .map(|i| midnight + Duration::minutes(i * i64::from(minutes))),
            );
        }
    }
    starts.sort();
    starts.dedup();
    starts
}

/// When the next automatic backup starts: the first window start on a
/// backup day at or after `now` (`PreferredNextBackupTime`).
pub fn next_backup_time(policy: &BackupPolicy, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    slots(policy, now, 0, 8).into_iter().find(|s| *s >= now)
}

/// The window an automatic backup is owed for at `now`: the latest window
/// start at or before `now` that is newer than both the last one served and
/// the policy's last change. A server that was down past a window therefore
/// runs the backup at its next chance, once.
pub fn due_slot(policy: &BackupPolicy, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let latest = slots(policy, now, 8, 0)
        .into_iter()
        .rev()
        .find(|s| *s <= now)?;
    let served = policy.last_auto_slot.is_some_and(|last| last >= latest);
    (!served && latest >= policy.updated_at).then_some(latest)
}

/// RDS's formats: `yyyy-MM-ddTHH:mmZ` and `yyyy-MM-ddTHH:mm:ssZ`.
pub fn format_minutes(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%MZ").to_string()
}

/// A time as RDS writes it, `yyyy-MM-ddTHH:mm:ssZ`.
pub fn format_seconds(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn policy(days: &str, window: &str, updated: &str) -> BackupPolicy {
        BackupPolicy {
            backup_days: parse_days(days).unwrap(),
            backup_window: window.into(),
            updated_at: at(updated),
            ..default_policy("x", at(updated))
        }
    }

    #[test]
    fn days_need_two_known_names() {
        assert_eq!(
            parse_days("thursday, Monday").unwrap(),
            ["Monday", "Thursday"]
        );
        assert_eq!(
            parse_days("Monday").unwrap_err().kind,
            Refusal::BackupDaysMalformed
        );
        assert_eq!(
            parse_days("Monday,Monday").unwrap_err().kind,
            Refusal::BackupDaysMalformed
        );
        assert!(parse_days("Monday,Funday")
            .unwrap_err()
            .message
            .contains("Funday"));
    }

    #[test]
    fn windows_are_one_hour() {
        assert_eq!(
            parse_window("02:00Z-03:00Z").unwrap(),
            NaiveTime::from_hms_opt(2, 0, 0).unwrap()
        );
        assert_eq!(
            parse_window("23:30Z-00:30Z").unwrap(),
            NaiveTime::from_hms_opt(23, 30, 0).unwrap()
        );
        for bad in [
            "02:00Z-04:00Z",
            "02:00-03:00",
            "2:00Z-3:00Z",
            "25:00Z-26:00Z",
            "",
            "02:00Z",
        ] {
            assert_eq!(
                parse_window(bad).unwrap_err().kind,
                Refusal::BackupWindowMalformed,
                "{bad}"
            );
        }
    }

    #[test]
    fn retention_bounds() {
        assert!(check_data_retention(7).is_ok() && check_data_retention(730).is_ok());
        assert_eq!(
            check_data_retention(6).unwrap_err().kind,
            Refusal::DataRetentionMalformed
        );
        assert_eq!(
            check_data_retention(731).unwrap_err().kind,
            Refusal::DataRetentionMalformed
        );
        assert_eq!(
            check_log_retention(8, 7).unwrap_err().kind,
            Refusal::ConflictingParameters
        );
        assert_eq!(
            check_log_retention(6, 30).unwrap_err().kind,
            Refusal::LogRetentionMalformed
        );
        assert_eq!(
            check_log_retention(7301, 7400).unwrap_err().kind,
            Refusal::LogRetentionMalformed
        );
        assert_eq!(check_log_retention(30, 30).unwrap(), 30);
    }

    fn rule(id: &str, kind: RuleKind, days: u32) -> DataRule {
        DataRule {
            id: id.into(),
            kind,
            retention_days: days,
        }
    }

    #[test]
    fn retention_options_refuse_every_bad_value() {
        use strata_catalog::MonthDay;
        assert_eq!(
            check_backup_interval(Some(15), BackupMethod::Snapshot).unwrap(),
            Some(15)
        );
        assert_eq!(
            check_backup_interval(None, BackupMethod::Physical).unwrap(),
            None
        );
        assert_eq!(
            check_backup_interval(Some(20), BackupMethod::Snapshot)
                .unwrap_err()
                .kind,
            Refusal::BackupIntervalMalformed
        );
        assert_eq!(
            check_backup_interval(Some(60), BackupMethod::Physical)
                .unwrap_err()
                .kind,
            Refusal::BackupIntervalNeedsSnapshot
        );

        let weekly = |days: Vec<Weekday>| RuleKind::Weekly { days };
        let monthly = |days: Vec<MonthDay>| RuleKind::Monthly { days };
        let good = [
            rule("sat", weekly(vec![Weekday::Sat]), 30),
            rule("ends", monthly(vec![MonthDay::Day(1), MonthDay::Last]), 365),
            rule("leap", RuleKind::Yearly { month: 2, day: 29 }, 3650),
        ];
        check_data_rules(&good).unwrap();
        let bad = [
            rule("", weekly(vec![Weekday::Sat]), 30),
            rule("a b", weekly(vec![Weekday::Sat]), 30),
            rule("regular", weekly(vec![Weekday::Sat]), 30),
            rule("w", weekly(vec![]), 30),
            rule("w", weekly(vec![Weekday::Sat, Weekday::Sat]), 30),
            rule("w", weekly(vec![Weekday::Sat]), 0),
            rule("w", weekly(vec![Weekday::Sat]), 3651),
            rule("m", monthly(vec![]), 30),
            rule("m", monthly(vec![MonthDay::Day(32)]), 30),
            rule("m", monthly(vec![MonthDay::Last, MonthDay::Last]), 30),
            rule("y", RuleKind::Yearly { month: 2, day: 30 }, 30),
            rule("y", RuleKind::Yearly { month: 13, day: 1 }, 30),
        ];
        for r in bad {
            assert_eq!(
                check_data_rule(&r).unwrap_err().kind,
                Refusal::AdvancedPolicyMalformed,
                "{r:?}"
            );
        }
        let twice = [good[0].clone(), good[0].clone()];
        assert!(check_data_rules(&twice)
            .unwrap_err()
            .message
            .contains("twice"));

        check_archive(0, ArchiveKeepPolicy::ByMonth, 1).unwrap();
        check_archive(1095, ArchiveKeepPolicy::ByMonth, 31).unwrap();
        check_archive(30, ArchiveKeepPolicy::KeepAll, 0).unwrap();
        for (days, keep, count) in [
            (29, ArchiveKeepPolicy::ByMonth, 1),
            (1096, ArchiveKeepPolicy::ByMonth, 1),
            (30, ArchiveKeepPolicy::ByMonth, 32),
            (30, ArchiveKeepPolicy::ByMonth, 0),
            (30, ArchiveKeepPolicy::ByWeek, 8),
        ] {
            assert_eq!(
                check_archive(days, keep, count).unwrap_err().kind,
                Refusal::ArchivePolicyMalformed,
                "{days} {keep} {count}"
            );
        }

        assert_eq!(check_keep_last(Some(5)).unwrap(), Some(5));
        assert_eq!(
            check_keep_last(Some(0)).unwrap_err().kind,
            Refusal::KeepLastMalformed
        );

        let now = at("2026-12-06T10:00:00Z");
        check_keep(KeepUntil::Forever, Some("audit 2026"), now).unwrap();
        check_keep(KeepUntil::Until(at("2027-01-01T00:00:00Z")), None, now).unwrap();
        for (until, note) in [
            (KeepUntil::Until(now), None),
            (KeepUntil::Forever, Some("two\nlines")),
            (KeepUntil::Forever, Some(&*"x".repeat(257))),
        ] {
            assert_eq!(
                check_keep(until, note, now).unwrap_err().kind,
                Refusal::KeepMalformed
            );
        }

        let mut p = default_policy("x", now);
        check_retention_options(&p).unwrap();
        p.advanced_log_retention_days = Some(3);
        assert_eq!(
            check_retention_options(&p).unwrap_err().kind,
            Refusal::LogRetentionMalformed
        );
    }

    #[test]
    fn default_policy_is_valid_and_spread() {
        let now = at("2026-11-25T10:00:00Z");
        let mut windows = std::collections::HashSet::new();
        for i in 0..50 {
            let p = default_policy(&format!("pg-{i}"), now);
            assert_eq!(p.backup_days.len(), 2);
            parse_days(&p.backup_days.join(",")).unwrap();
            parse_window(&p.backup_window).unwrap();
            assert!(p.log_backup_enabled);
            windows.insert(p.backup_window.clone());
        }
        assert!(windows.len() > 5, "windows should differ between instances");
    }

    #[test]
    fn next_backup_time_is_the_next_window_start() {
        // 2026-11-25 is a Wednesday.
        let p = policy("Monday,Thursday", "02:00Z-03:00Z", "2026-11-01T00:00:00Z");
        assert_eq!(
            next_backup_time(&p, at("2026-11-25T10:00:00Z")),
            Some(at("2026-11-26T02:00:00Z"))
        );
        assert_eq!(
            next_backup_time(&p, at("2026-11-26T02:00:00Z")),
            Some(at("2026-11-26T02:00:00Z"))
        );
        assert_eq!(
            next_backup_time(&p, at("2026-11-26T02:00:01Z")),
            Some(at("2026-11-30T02:00:00Z"))
        );
        let p = policy("Wednesday,Sunday", "23:00Z-00:00Z", "2026-11-01T00:00:00Z");
        assert_eq!(
            next_backup_time(&p, at("2026-11-25T10:00:00Z")),
            Some(at("2026-11-25T23:00:00Z"))
        );
    }

    #[test]
    fn due_slot_fires_once_per_window_and_after_downtime() {
        let mut p = policy("Monday,Thursday", "02:00Z-03:00Z", "2026-11-20T00:00:00Z");
        // Before Monday's window nothing since the policy changed is owed.
        assert_eq!(due_slot(&p, at("2026-11-23T01:59:59Z")), None);
        assert_eq!(
            due_slot(&p, at("2026-11-23T02:00:00Z")),
            Some(at("2026-11-23T02:00:00Z"))
        );
        p.last_auto_slot = Some(at("2026-11-23T02:00:00Z"));
        assert_eq!(due_slot(&p, at("2026-11-23T02:30:00Z")), None);
        // Down from Wednesday to Friday: Thursday's backup runs on Friday, once.
        assert_eq!(
            due_slot(&p, at("2026-11-27T09:00:00Z")),
            Some(at("2026-11-26T02:00:00Z"))
        );
        p.last_auto_slot = Some(at("2026-11-26T02:00:00Z"));
        assert_eq!(due_slot(&p, at("2026-11-28T09:00:00Z")), None);
        // Windows before the policy changed are not owed.
        p.updated_at = at("2026-11-30T03:00:00Z");
        assert_eq!(due_slot(&p, at("2026-11-30T04:00:00Z")), None);
    }

    #[test]
    fn rule_schedules_parse_and_print_back() {
        for (ty, value, printed) in [
            ("Weekly", "friday, Monday", "Monday,Friday"),
            ("monthly", "Last,15,1", "1,15,Last"),
            ("Yearly", "2-29", "02-29"),
        ] {
            let kind = parse_rule_kind(ty, value).unwrap();
            let (t, v) = rule_filter(&kind);
            assert_eq!(v, printed);
            assert_eq!(parse_rule_kind(t, &v).unwrap(), kind);
        }
        for (ty, value) in [
            ("Weekly", "Funday"),
            ("Monthly", "32"),
            ("Monthly", "first"),
            ("Yearly", "12/31"),
            ("Daily", "1"),
        ] {
            assert_eq!(
                parse_rule_kind(ty, value).unwrap_err().kind,
                Refusal::AdvancedPolicyMalformed,
                "{ty} {value}"
            );
        }
    }

    #[test]
    fn high_frequency_snapshots_run_every_interval_on_backup_days() {
        // Monday and Thursday, window 02:00, snapshots every 4 hours.
        let mut p = policy("Monday,Thursday", "02:00Z-03:00Z", "2026-11-20T00:00:00Z");
        p.backup_method = BackupMethod::Snapshot;
        p.backup_interval_minutes = Some(240);
        // Monday 23 November: aligned to midnight, the window on top.
        assert_eq!(
            due_slot(&p, at("2026-11-23T00:10:00Z")),
            Some(at("2026-11-23T00:00:00Z"))
        );
        assert_eq!(
            due_slot(&p, at("2026-11-23T02:30:00Z")),
            Some(at("2026-11-23T02:00:00Z"))
        );
        assert_eq!(
            next_backup_time(&p, at("2026-11-23T02:30:00Z")),
            Some(at("2026-11-23T04:00:00Z"))
        );
        p.last_auto_slot = Some(at("2026-11-23T20:00:00Z"));
        // Tuesday is no backup day: nothing until Thursday's midnight.
        assert_eq!(due_slot(&p, at("2026-11-24T12:00:00Z")), None);
        assert_eq!(
            next_backup_time(&p, at("2026-11-24T12:00:00Z")),
            Some(at("2026-11-26T00:00:00Z"))
        );
        // Physical backups take no high-frequency ones.
        p.backup_method = BackupMethod::Physical;
        assert_eq!(
            next_backup_time(&p, at("2026-11-23T02:30:00Z")),
            Some(at("2026-11-26T02:00:00Z"))
        );
    }

    #[test]
    fn advanced_rules_add_their_days() {
        let mut p = policy("Monday,Thursday", "02:00Z-03:00Z", "2026-11-20T00:00:00Z");
        p.advanced_data_rules = vec![DataRule {
            id: "month-end".into(),
            kind: parse_rule_kind("Monthly", "Last").unwrap(),
            retention_days: 365,
        }];
        // Monday 30 November is the month's last day; Tuesday 1 December no backup day.
        let sunday = at("2026-11-29T12:00:00Z");
        assert_eq!(
            next_backup_time(&p, sunday),
            Some(at("2026-11-30T02:00:00Z"))
        );
        p.backup_days = parse_days("Tuesday,Wednesday").unwrap();
        // Off, the rule takes nothing; on, it adds the month's last day.
        assert_eq!(
            next_backup_time(&p, sunday),
            Some(at("2026-12-01T02:00:00Z"))
        );
        p.advanced_enabled = true;
        assert_eq!(
            next_backup_time(&p, sunday),
            Some(at("2026-11-30T02:00:00Z"))
        );
        // The set of that day is stamped with the rule's retention.
        let rule = p.rule_for(at("2026-11-30T02:00:00Z")).unwrap();
        assert_eq!(
            (rule.rule.as_str(), rule.retention_days),
            ("month-end", 365)
        );
    }

    #[test]
    fn hostile_rule_ids_and_keep_notes_are_refused_or_kept_as_data() {
        let weekly = || RuleKind::Weekly {
            days: vec![Weekday::Sun],
        };
        for id in [
            "..",
            "../x",
            "a=b",
            "it's",
            "\"q\"",
            "a\nb",
            "a b",
            "",
            &"r".repeat(65),
        ] {
            assert_eq!(
                check_data_rule(&rule(id, weekly(), 30)).unwrap_err().kind,
                Refusal::AdvancedPolicyMalformed,
                "{id:?}"
            );
        }
        assert!(check_data_rule(&rule(&"r".repeat(64), weekly(), 30)).is_ok());
        let now = Utc::now();
        for note in ["line\nbreak", "tab\there", "nul\0"] {
            assert_eq!(
                check_keep(KeepUntil::Forever, Some(note), now)
                    .unwrap_err()
                    .kind,
                Refusal::KeepMalformed,
                "{note:?}"
            );
        }
        // Quotes, '=' and '..' are text in a note, never syntax.
        for note in [
            "a=b",
            "'; DROP TABLE x; --",
            "\"..\"",
            &"n".repeat(KEEP_NOTE_CHARS),
        ] {
            assert!(
                check_keep(KeepUntil::Forever, Some(note), now).is_ok(),
                "{note:?}"
            );
        }
        assert!(check_keep(
            KeepUntil::Forever,
            Some(&"n".repeat(KEEP_NOTE_CHARS + 1)),
            now
        )
        .is_err());
    }
}
