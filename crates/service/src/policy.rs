//! Backup policies as RDS defines them: the days of the week and the daily
//! one-hour window for automatic data backups, data retention 7–730 days, log
//! backup on or off, log retention 7–7300 days and never above data
//! retention. Parsing, validation (refusing with a [`Refusal`] kind the API
//! maps to RDS's error code), defaults and the schedule arithmetic live here
//! as pure functions.

use chrono::{DateTime, Datelike, Duration, NaiveTime, TimeZone, Utc, Weekday};
use strata_catalog::BackupPolicy;

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
        backup_method: strata_catalog::BackupMethod::Physical,
    }
}

fn weekday_name(d: Weekday) -> &'static str {
    WEEKDAYS[d.num_days_from_monday() as usize]
}

/// Window starts of `policy` on the backup days, from the day before
/// `around` minus `back` days to `forward` days after.
fn slots(
    policy: &BackupPolicy,
    around: DateTime<Utc>,
    back: i64,
    forward: i64,
) -> Vec<DateTime<Utc>> {
    let Ok(start) = parse_window(&policy.backup_window) else {
        return Vec::new();
    };
    let today = around.date_naive();
    (-back..=forward)
        .map(|d| today + Duration::days(d))
        .filter(|day| {
            policy
                .backup_days
                .iter()
                .any(|b| b == weekday_name(day.weekday()))
        })
        .map(|day| Utc.from_utc_datetime(&day.and_time(start)))
        .collect()
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
}
