//! The retention decision: one pure function of (policy, sets, WAL, now)
//! that says, for every backup set, whether it stays, what keeps it and
//! until when, and which WAL objects may go. The retention pass deletes
//! what it says; the dry run and the set lists show it.
//!
//! A set is kept while any of these holds (each has an end, or none):
//! - it is running, or it is the newest successful set (no end);
//! - it is the base of the oldest recoverable point (until the next set
//!   leaves the log retention window);
//! - it is kept by hand, forever or until a time;
//! - it is among the policy's last N sets (count-based retention; no end);
//! - its retention rule: the regular retention, or the advanced rule it was
//!   taken under (a rule still in the policy with its current retention, a
//!   deleted one with the retention stamped on the set);
//! - high-frequency thinning, for the extra snapshots of a day: at minute
//!   intervals every snapshot of the last hour, the first of each clock
//!   hour for 24 hours; at hour intervals every snapshot for 24 hours. The
//!   first snapshot after 00:00 of each day follows its retention rule;
//! - archived backups: the first N sets of each month or week (or all),
//!   for the archive retention.
//!
//! The reason shown (`kept_by`) is the holding reason that lasts longest;
//! the expected expiry is the latest end of the dated reasons (retention,
//! thinning, archive, a keep until a time): when the set goes unless the
//! newest set, the recovery window or the last N still need it.

use std::collections::{BTreeMap, HashSet};
use std::fmt;

use chrono::{DateTime, Datelike, Duration, Timelike, Utc};
use pg_wal::Lsn;
use serde::{Serialize, Serializer};
use strata_catalog::{
    ArchiveKeepPolicy, BackupId, BackupMode, BackupPolicy, BackupSet, BackupStatus, KeepUntil,
    WalSegmentRow, REGULAR_RULE_ID,
};

/// Why a set stays (or, for a set that goes, the last reason that ended).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeptBy {
    /// Being taken.
    Running,
    /// The newest successful set: nothing could be restored without it.
    Newest,
    /// The base of the oldest point in time still recoverable.
    PitrBase,
    /// Kept by hand, with its note.
    Hand {
        /// Forever or until a time.
        until: KeepUntil,
        /// Why, for people.
        note: Option<String>,
    },
    /// Among the policy's last N successful sets.
    LastSets(u32),
    /// The regular retention.
    Regular {
        /// Days kept.
        days: u32,
    },
    /// An advanced rule.
    Rule {
        /// The rule's id.
        id: String,
        /// Its kind (`weekly`, `monthly`, `yearly`); `None` once the rule
        /// was deleted (the set keeps the retention stamped on it).
        kind: Option<&'static str>,
        /// Days kept.
        days: u32,
    },
    /// High-frequency thinning: a snapshot of the last hour (minute
    /// intervals).
    HighFrequencyLastHour,
    /// High-frequency thinning: the first snapshot of its clock hour, for
    /// 24 hours (minute intervals).
    HighFrequencyHourly,
    /// High-frequency thinning: a snapshot of the last 24 hours (hour
    /// intervals).
    HighFrequencyLastDay,
    /// An archived backup.
    Archive {
        /// Which sets are archived.
        policy: ArchiveKeepPolicy,
        /// Days archived sets are kept.
        days: u32,
    },
}

impl fmt::Display for KeptBy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeptBy::Running => f.write_str("running"),
            KeptBy::Newest => f.write_str("newest"),
            KeptBy::PitrBase => f.write_str("pitr-base"),
            KeptBy::Hand { until, note } => {
                match until {
                    KeepUntil::Forever => f.write_str("kept forever")?,
                    KeepUntil::Until(t) => write!(
                        f,
                        "kept until {}",
                        t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                    )?,
                }
                match note {
                    Some(n) => write!(f, " ({n})"),
                    None => Ok(()),
                }
            }
            KeptBy::LastSets(n) => write!(f, "last {n} sets"),
            KeptBy::Regular { days } => write!(f, "regular {days} days"),
            KeptBy::Rule {
                id,
                kind: Some(kind),
                days,
            } => write!(f, "rule {id} {kind} {days} days"),
            KeptBy::Rule {
                id,
                kind: None,
                days,
            } => write!(f, "rule {id} (deleted) {days} days"),
            KeptBy::HighFrequencyLastHour => f.write_str("high-frequency last hour"),
            KeptBy::HighFrequencyHourly => f.write_str("high-frequency hourly"),
            KeptBy::HighFrequencyLastDay => f.write_str("high-frequency last 24 hours"),
            KeptBy::Archive { policy, days } => write!(f, "archive {policy} {days} days"),
        }
    }
}

impl Serialize for KeptBy {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// What retention decided for one set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SetDecision {
    /// The set.
    pub backup_id: BackupId,
    /// Whether retention deletes it now.
    pub delete: bool,
    /// What keeps it; for a set that goes, the last reason that ended.
    pub kept_by: KeptBy,
    /// When retention is expected to let it go (see the module's notes);
    /// `None`: no date (kept forever, newest, running…).
    pub expires_at: Option<DateTime<Utc>>,
}

/// The whole decision for an instance at one moment.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RetentionDecision {
    /// One decision per set, in the order the sets were given.
    pub sets: Vec<SetDecision>,
    /// WAL objects to delete.
    pub wal: Vec<WalSegmentRow>,
}

impl RetentionDecision {
    /// The sets to delete.
    pub fn deleted(&self) -> impl Iterator<Item = &SetDecision> {
        self.sets.iter().filter(|d| d.delete)
    }
}

/// One reason to keep a set and when it ends (`None`: no end).
type Reason = (KeptBy, Option<DateTime<Utc>>);

/// When a set counts as taken for retention: its end (its start while it
/// has none).
fn taken_at(b: &BackupSet) -> DateTime<Utc> {
    b.finished_at.unwrap_or(b.started_at)
}

/// What the policy knows of the sets as a whole: the newest, the recovery
/// base, the last N, the high-frequency extras and the archived ones.
struct Context<'a> {
    policy: &'a BackupPolicy,
    now: DateTime<Utc>,
    newest: Option<BackupId>,
    anchor: Option<(BackupId, Option<DateTime<Utc>>)>,
    last_n: HashSet<BackupId>,
    /// High-frequency snapshots that are not the first of their day, with
    /// whether each is the first of its clock hour.
    hf_extras: BTreeMap<BackupId, bool>,
    archived: HashSet<BackupId>,
}

impl<'a> Context<'a> {
    fn new(policy: &'a BackupPolicy, backups: &[BackupSet], now: DateTime<Utc>) -> Self {
        let successes = super::successes(backups);
        let log_start = now - Duration::days(policy.effective_log_retention_days() as i64);
        let anchor = if policy.log_backup_enabled {
            super::pitr_anchor(backups, log_start).map(|id| {
                // The base moves on once the next set leaves the window.
                let next = successes.iter().skip_while(|b| b.id != id).nth(1).map(|b| {
                    taken_at(b) + Duration::days(policy.effective_log_retention_days() as i64)
                });
                (id, next)
            })
        } else {
            None
        };
        let last_n = match policy.keep_last {
            Some(n) => successes
                .iter()
                .rev()
                .take(n as usize)
                .map(|b| b.id.clone())
                .collect(),
            None => HashSet::new(),
        };
        let hf_extras = high_frequency_extras(policy, &successes);
        let archived = archived(policy, &successes, &hf_extras);
        Context {
            policy,
            now,
            newest: super::newest_success(backups),
            anchor,
            last_n,
            hf_extras,
            archived,
        }
    }

    /// The retention rule of `b` and when it ends.
    fn rule_reason(&self, b: &BackupSet) -> Reason {
        let p = self.policy;
        let regular = || {
            (
                KeptBy::Regular {
                    days: p.backup_retention_days,
                },
                p.backup_retention_days,
            )
        };
        let (why, days) = match &b.taken_under {
            Some(t) if t.rule != REGULAR_RULE_ID => {
                let current = p
                    .advanced_data_rules
                    .iter()
                    .find(|r| p.advanced_enabled && r.id == t.rule);
                match current {
                    Some(r) => (
                        KeptBy::Rule {
                            id: r.id.clone(),
                            kind: Some(r.kind.name()),
                            days: r.retention_days,
                        },
                        r.retention_days,
                    ),
                    None => (
                        KeptBy::Rule {
                            id: t.rule.clone(),
                            kind: None,
                            days: t.retention_days,
                        },
                        t.retention_days,
                    ),
                }
            }
            _ => regular(),
        };
        (why, Some(taken_at(b) + Duration::days(days as i64)))
    }

    /// Every reason that applies to successful set `b`, held or ended.
    fn reasons(&self, b: &BackupSet) -> Vec<Reason> {
        let p = self.policy;
        let mut reasons = Vec::new();
        if let Some(keep) = b.keep_until {
            let end = match keep {
                KeepUntil::Forever => None,
                KeepUntil::Until(t) => Some(t),
            };
            let note = b.keep_note.clone();
            reasons.push((KeptBy::Hand { until: keep, note }, end));
        }
        if self.newest.as_ref() == Some(&b.id) {
            reasons.push((KeptBy::Newest, None));
        }
        if let Some((_, end)) = self.anchor.as_ref().filter(|(id, _)| id == &b.id) {
            reasons.push((KeptBy::PitrBase, *end));
        }
        if self.last_n.contains(&b.id) {
            reasons.push((KeptBy::LastSets(p.keep_last.unwrap_or(0)), None));
        }
        match self.hf_extras.get(&b.id) {
            Some(first_of_hour) => {
                let minutes = p.backup_interval_minutes.unwrap_or(60);
                if minutes < 60 {
                    reasons.push((
                        KeptBy::HighFrequencyLastHour,
                        Some(b.started_at + Duration::hours(1)),
                    ));
                    if *first_of_hour {
                        reasons.push((
                            KeptBy::HighFrequencyHourly,
                            Some(b.started_at + Duration::hours(24)),
                        ));
                    }
                } else {
                    reasons.push((
                        KeptBy::HighFrequencyLastDay,
                        Some(b.started_at + Duration::hours(24)),
                    ));
                }
            }
            None => reasons.push(self.rule_reason(b)),
        }
        if self.archived.contains(&b.id) {
            let days = p.archive_retention_days;
            reasons.push((
                KeptBy::Archive {
                    policy: p.archive_keep_policy,
                    days,
                },
                Some(taken_at(b) + Duration::days(days as i64)),
            ));
        }
        reasons
    }

    fn decide(&self, b: &BackupSet) -> SetDecision {
        let id = b.id.clone();
        match b.status {
            BackupStatus::Running => SetDecision {
                backup_id: id,
                delete: false,
                kept_by: KeptBy::Running,
                expires_at: None,
            },
            // A failed set holds nothing worth keeping by hand or by
            // count; it goes after the regular retention.
            BackupStatus::Failed => {
                let days = self.policy.backup_retention_days;
                let end = taken_at(b) + Duration::days(days as i64);
                SetDecision {
                    backup_id: id,
                    delete: end <= self.now,
                    kept_by: KeptBy::Regular { days },
                    expires_at: Some(end),
                }
            }
            BackupStatus::Success => {
                let reasons = self.reasons(b);
                let holds = |end: &Option<DateTime<Utc>>| end.is_none_or(|e| self.now < e);
                let lasts = |r: &&Reason| (r.1.is_none(), r.1);
                // Of reasons lasting as long, the first listed is shown.
                let held = reasons
                    .iter()
                    .rev()
                    .filter(|r| holds(&r.1))
                    .max_by_key(lasts);
                let ended = reasons.iter().rev().max_by_key(lasts);
                let expires_at = if matches!(b.keep_until, Some(KeepUntil::Forever)) {
                    None
                } else {
                    reasons
                        .iter()
                        .filter(|r| !matches!(r.0, KeptBy::Newest | KeptBy::PitrBase))
                        .filter_map(|r| r.1)
                        .max()
                };
                let (delete, kept_by) = match (held, ended) {
                    (Some(r), _) => (false, r.0.clone()),
                    (None, Some(r)) => (true, r.0.clone()),
                    (None, None) => (true, self.rule_reason(b).0),
                };
                SetDecision {
                    backup_id: id,
                    delete,
                    kept_by,
                    expires_at,
                }
            }
        }
    }
}

/// Whether `b` is thinned as a high-frequency snapshot: with an interval
/// set, automatic sets of the regular rule.
fn thinned(policy: &BackupPolicy, b: &BackupSet) -> bool {
    policy.backup_interval_minutes.is_some()
        && b.mode == BackupMode::Automated
        && b.taken_under
            .as_ref()
            .is_none_or(|t| t.rule == REGULAR_RULE_ID)
}

/// The high-frequency snapshots that are not the first after 00:00 of
/// their day, each with whether it is the first of its clock hour.
fn high_frequency_extras(
    policy: &BackupPolicy,
    successes: &[&BackupSet],
) -> BTreeMap<BackupId, bool> {
    let mut days = HashSet::new();
    let mut hours = HashSet::new();
    let mut extras = BTreeMap::new();
    for b in successes.iter().filter(|b| thinned(policy, b)) {
        let t = b.started_at;
        let first_of_hour = hours.insert((t.date_naive(), t.hour()));
        if !days.insert(t.date_naive()) {
            extras.insert(b.id.clone(), first_of_hour);
        }
    }
    extras
}

/// The archived sets: the first N of each month or week (or all), of the
/// sets that are not high-frequency extras.
fn archived(
    policy: &BackupPolicy,
    successes: &[&BackupSet],
    hf_extras: &BTreeMap<BackupId, bool>,
) -> HashSet<BackupId> {
    if policy.archive_retention_days == 0 {
        return HashSet::new();
    }
    let mut per_period: BTreeMap<(i32, u32), u32> = BTreeMap::new();
    successes
        .iter()
        .filter(|b| !hf_extras.contains_key(&b.id))
        .filter(|b| {
            let t = b.started_at;
            let period = match policy.archive_keep_policy {
                ArchiveKeepPolicy::KeepAll => return true,
                ArchiveKeepPolicy::ByMonth => (t.year(), t.month()),
                ArchiveKeepPolicy::ByWeek => {
                    let w = t.iso_week();
                    (w.year(), w.week())
                }
            };
            let n = per_period.entry(period).or_insert(0);
            *n += 1;
            *n <= policy.archive_keep_count
        })
        .map(|b| b.id.clone())
        .collect()
}

/// Decides, at `now`, every set's fate under `policy` and which WAL goes.
/// Pure: the tests run it over a simulated year with a manual clock.
pub fn decide_retention(
    policy: &BackupPolicy,
    backups: &[BackupSet],
    wal: &[WalSegmentRow],
    now: DateTime<Utc>,
) -> RetentionDecision {
    let ctx = Context::new(policy, backups, now);
    let sets: Vec<SetDecision> = backups.iter().map(|b| ctx.decide(b)).collect();
    let deleted: HashSet<&BackupId> = sets
        .iter()
        .filter(|d| d.delete)
        .map(|d| &d.backup_id)
        .collect();
    let successes = super::successes(backups);
    let kept_ranges: Vec<(Lsn, Lsn)> = successes
        .iter()
        .filter(|b| !deleted.contains(&b.id))
        .filter_map(|b| Some((b.start_lsn?, b.stop_lsn?)))
        .collect();
    let needed_by_a_set = |w: &WalSegmentRow| {
        kept_ranges
            .iter()
            .any(|&(start, stop)| w.begin_lsn <= stop && w.end_lsn > start)
    };
    let log_start = now - Duration::days(policy.effective_log_retention_days() as i64);
    let anchor_start = ctx
        .anchor
        .as_ref()
        .and_then(|(id, _)| successes.iter().find(|b| &b.id == id))
        .and_then(|b| b.start_lsn);
    let wal = wal
        .iter()
        .filter(|w| !needed_by_a_set(w))
        .filter(|w| {
            if !policy.log_backup_enabled {
                true
            } else if let Some(start) = anchor_start {
                w.end_lsn <= start
            } else {
                w.last_commit.unwrap_or(w.stored_at) < log_start && successes.is_empty()
            }
        })
        .cloned()
        .collect();
    RetentionDecision { sets, wal }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{NaiveDate, TimeZone, Weekday};
    use strata_catalog::{BackupMethod, DataRule, MonthDay, RuleKind, TakenUnder};

    fn t(y: i32, m: u32, d: u32, h: u32, min: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, m, d, h, min, 0).unwrap()
    }

    fn policy(days: &[&str], retention: u32) -> BackupPolicy {
        let mut p = BackupPolicy::regular(
            "i",
            days.iter().map(|d| d.to_string()).collect(),
            "02:00Z-03:00Z",
            retention,
            7,
            t(2025, 12, 1, 0, 0),
        );
        p.log_backup_enabled = false;
        p
    }

    const EVERY_DAY: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];

    /// An automatic set started at `start`, finished five minutes later
    /// (one minute for snapshots), stamped with the rule `policy` gives it.
    fn taken(policy: &BackupPolicy, start: DateTime<Utc>) -> BackupSet {
        let id = start.format("%Y%m%dT%H%M%SZ").to_string();
        let mut b = BackupSet::started(id.into(), "i", BackupMode::Automated, start, None);
        b.status = BackupStatus::Success;
        let minutes = if policy.backup_interval_minutes.is_some() {
            1
        } else {
            5
        };
        b.finished_at = Some(start + Duration::minutes(minutes));
        b.taken_under = policy.rule_for(start);
        b
    }

    /// Applies the decision at `now` the way the retention pass does:
    /// deleted sets leave the list. Checks that each goes on time: its
    /// expected expiry has passed.
    fn pass(policy: &BackupPolicy, sets: &mut Vec<BackupSet>, now: DateTime<Utc>) {
        let d = decide_retention(policy, sets, &[], now);
        for gone in d.deleted() {
            let end = gone.expires_at.expect("a deleted set has an expiry");
            assert!(
                end <= now,
                "{} deleted at {now} before {end}",
                gone.backup_id
            );
        }
        let deleted: HashSet<BackupId> = d.deleted().map(|d| d.backup_id.clone()).collect();
        sets.retain(|b| !deleted.contains(&b.id));
    }

    fn kept_by(policy: &BackupPolicy, sets: &[BackupSet], now: DateTime<Utc>) -> Vec<String> {
        decide_retention(policy, sets, &[], now)
            .sets
            .iter()
            .map(|d| d.kept_by.to_string())
            .collect()
    }

    fn count(v: &[String], what: &str) -> usize {
        v.iter().filter(|s| *s == what).count()
    }

    #[test]
    fn fifteen_minute_snapshots_over_a_week_leave_33() {
        let mut p = policy(&EVERY_DAY, 7);
        p.backup_method = BackupMethod::Snapshot;
        p.backup_interval_minutes = Some(15);
        let mut sets = Vec::new();
        let start = t(2026, 3, 2, 0, 0);
        let mut now = start;
        while now < start + Duration::days(7) {
            sets.push(taken(&p, now));
            pass(&p, &mut sets, now + Duration::minutes(1));
            now += Duration::minutes(15);
        }
        let now = t(2026, 3, 8, 23, 59);
        pass(&p, &mut sets, now);
        // Every snapshot of the last hour (4), the first of each hour of the
        // last 24 (23 more), the first of each earlier day (6).
        assert_eq!(sets.len(), 4 + 23 + 6);
        let why = kept_by(&p, &sets, now);
        assert_eq!(count(&why, "newest"), 1);
        assert_eq!(count(&why, "high-frequency last hour"), 2);
        assert_eq!(count(&why, "high-frequency hourly"), 23);
        assert_eq!(count(&why, "regular 7 days"), 7);
        // The day's first snapshots stay their 7 days, the others go: a
        // day later the oldest day's first one is gone too.
        pass(&p, &mut sets, now + Duration::days(1));
        assert_eq!(sets.len(), 1 + 6);
    }

    #[test]
    fn hourly_snapshots_keep_a_day_then_one_a_day() {
        let mut p = policy(&EVERY_DAY, 7);
        p.backup_method = BackupMethod::Snapshot;
        p.backup_interval_minutes = Some(60);
        let mut sets = Vec::new();
        let start = t(2026, 3, 2, 0, 0);
        let mut now = start;
        while now < start + Duration::days(7) {
            sets.push(taken(&p, now));
            pass(&p, &mut sets, now + Duration::minutes(1));
            now += Duration::hours(1);
        }
        let now = t(2026, 3, 8, 23, 59);
        pass(&p, &mut sets, now);
        assert_eq!(sets.len(), 24 + 6);
        let why = kept_by(&p, &sets, now);
        assert_eq!(count(&why, "high-frequency last 24 hours"), 22);
    }

    /// The sparse policy of the year below; on 1 July `mid-month` is deleted
    /// and `sundays` shortened to 14 days.
    fn sparse(now: DateTime<Utc>) -> BackupPolicy {
        let changed = now >= t(2026, 7, 1, 0, 0);
        let mut p = policy(&["Monday", "Thursday"], 7);
        p.advanced_enabled = true;
        p.advanced_data_rules = vec![
            DataRule {
                id: "sundays".into(),
                kind: RuleKind::Weekly {
                    days: vec![Weekday::Sun],
                },
                retention_days: if changed { 14 } else { 30 },
            },
            DataRule {
                id: "month-ends".into(),
                kind: RuleKind::Monthly {
                    days: vec![MonthDay::Day(1), MonthDay::Last],
                },
                retention_days: 365,
            },
            DataRule {
                id: "new-year".into(),
                kind: RuleKind::Yearly { month: 1, day: 1 },
                retention_days: 3650,
            },
        ];
        if !changed {
            p.advanced_data_rules.push(DataRule {
                id: "mid-month".into(),
                kind: RuleKind::Monthly {
                    days: vec![MonthDay::Day(15)],
                },
                retention_days: 60,
            });
        }
        p
    }

    /// What the sparse policy keeps a set taken on `day` for, as of `now`,
    /// written out by hand: the longest rule of the day when it was taken,
    /// with `sundays`' current retention (it still exists) and the 60 days
    /// `mid-month` sets were taken with (it was deleted).
    fn expected_days(day: NaiveDate, now: DateTime<Utc>) -> Option<u32> {
        let last = day.succ_opt().unwrap().month() != day.month();
        let taken_before_july = day < NaiveDate::from_ymd_opt(2026, 7, 1).unwrap();
        let sundays = if now >= t(2026, 7, 1, 0, 0) { 14 } else { 30 };
        let mut rules: Vec<(&str, u32)> = Vec::new();
        if matches!(day.weekday(), Weekday::Mon | Weekday::Thu) {
            rules.push(("regular", 7));
        }
        if day.weekday() == Weekday::Sun {
            rules.push(("sundays", if taken_before_july { 30 } else { 14 }));
        }
        if day.day() == 1 || last {
            rules.push(("month-ends", 365));
        }
        if day.month() == 1 && day.day() == 1 {
            rules.push(("new-year", 3650));
        }
        if day.day() == 15 && taken_before_july {
            rules.push(("mid-month", 60));
        }
        // The first rule with the longest retention is the one stamped.
        let mut best: Option<(&str, u32)> = None;
        for r in rules {
            if best.is_none_or(|b| r.1 > b.1) {
                best = Some(r);
            }
        }
        best.map(|(rule, days)| if rule == "sundays" { sundays } else { days })
    }

    #[test]
    fn a_simulated_year_keeps_what_the_sparse_rules_keep_and_deletes_the_rest_on_time() {
        let mut sets: Vec<BackupSet> = Vec::new();
        let mut day = NaiveDate::from_ymd_opt(2026, 1, 1).unwrap();
        while day.year() == 2026 {
            let window = Utc.from_utc_datetime(&day.and_hms_opt(2, 0, 0).unwrap());
            let p = sparse(window);
            if p.rule_for(window).is_some() {
                sets.push(taken(&p, window));
            }
            // The retention pass runs twice a day.
            for hour in [12, 23] {
                let now = Utc.from_utc_datetime(&day.and_hms_opt(hour, 0, 0).unwrap());
                pass(&p, &mut sets, now);
                let kept: Vec<&str> = sets.iter().map(|b| b.id.as_str()).collect();
                let mut expected = Vec::new();
                let mut d = NaiveDate::from_ymd_opt(2026, 1, 1).unwrap();
                while d <= day {
                    let end = expected_days(d, now).map(|days| {
                        Utc.from_utc_datetime(&d.and_hms_opt(2, 5, 0).unwrap())
                            + Duration::days(days as i64)
                    });
                    if end.is_some_and(|e| now < e) {
                        expected.push(d.format("%Y%m%dT020000Z").to_string());
                    }
                    d = d.succ_opt().unwrap();
                }
                // The newest set stays whatever its rule says.
                if let Some(newest) = sets.last() {
                    if !expected.contains(&newest.id.to_string()) {
                        expected.push(newest.id.to_string());
                    }
                }
                assert_eq!(kept, expected, "at {now}");
            }
            day = day.succ_opt().unwrap();
        }
        // What each remaining set is kept by, and until when.
        let now = t(2026, 12, 31, 23, 0);
        let p = sparse(now);
        let d = decide_retention(&p, &sets, &[], now);
        let find = |id: &str| d.sets.iter().find(|s| s.backup_id == id).unwrap();
        let new_year = find("20260101T020000Z");
        assert_eq!(
            new_year.kept_by.to_string(),
            "rule new-year yearly 3650 days"
        );
        assert_eq!(
            new_year.expires_at,
            Some(t(2026, 1, 1, 2, 5) + Duration::days(3650))
        );
        assert_eq!(
            find("20260228T020000Z").kept_by.to_string(),
            "rule month-ends monthly 365 days"
        );
        assert_eq!(
            find("20261227T020000Z").kept_by.to_string(),
            "rule sundays weekly 14 days"
        );
        assert_eq!(find("20261231T020000Z").kept_by.to_string(), "newest");
        // A set of the deleted rule keeps the retention it was taken with.
        let july = t(2026, 7, 20, 12, 0);
        let mut p = sparse(july);
        let june = taken(&sparse(t(2026, 6, 15, 2, 0)), t(2026, 6, 15, 2, 0));
        let newer = taken(&p, t(2026, 7, 20, 2, 0));
        let d = decide_retention(&p, &[june.clone(), newer.clone()], &[], july);
        assert_eq!(
            d.sets[0].kept_by.to_string(),
            "rule mid-month (deleted) 60 days"
        );
        assert!(!d.sets[0].delete);
        // Turning the advanced policy off deletes no rule's sets early either.
        p.advanced_enabled = false;
        let d = decide_retention(&p, &[june, newer], &[], july);
        assert_eq!(
            d.sets[0].kept_by.to_string(),
            "rule mid-month (deleted) 60 days"
        );
    }

    #[test]
    fn archives_keep_the_first_sets_of_each_month_beyond_the_regular_retention() {
        let mut p = policy(&EVERY_DAY, 7);
        p.archive_retention_days = 365;
        p.archive_keep_policy = ArchiveKeepPolicy::ByMonth;
        p.archive_keep_count = 2;
        let mut sets = Vec::new();
        let mut now = t(2026, 1, 1, 2, 0);
        while now < t(2027, 1, 1, 0, 0) {
            sets.push(taken(&p, now));
            pass(&p, &mut sets, now + Duration::hours(10));
            now += Duration::days(1);
        }
        let now = t(2026, 12, 31, 23, 0);
        pass(&p, &mut sets, now);
        // Days 1 and 2 of every month, and the last 7 days (25–31 December).
        assert_eq!(sets.len(), 2 * 12 + 7);
        let why = kept_by(&p, &sets, now);
        assert_eq!(count(&why, "archive ByMonth 365 days"), 24);
        // A year on, January's go first.
        pass(&p, &mut sets, t(2027, 1, 2, 3, 0));
        assert!(!sets.iter().any(|b| b.id.starts_with("20260101")));
        assert!(sets.iter().any(|b| b.id.starts_with("20260201")));

        // By week: the first of each ISO week.
        p.archive_keep_policy = ArchiveKeepPolicy::ByWeek;
        p.archive_keep_count = 1;
        let mut sets: Vec<BackupSet> = (0..28)
            .map(|d| taken(&p, t(2026, 3, 2, 2, 0) + Duration::days(d)))
            .collect();
        pass(&p, &mut sets, t(2026, 3, 30, 1, 0));
        let mondays = sets
            .iter()
            .filter(|b| b.started_at.weekday() == Weekday::Mon)
            .count();
        // 23–29 March by the regular retention, and the Mondays before.
        assert_eq!((sets.len(), mondays), (7 + 3, 4));
    }

    #[test]
    fn keep_by_hand_and_the_last_sets_outlast_the_retention() {
        let mut p = policy(&EVERY_DAY, 7);
        let mut sets: Vec<BackupSet> = (0..30)
            .map(|d| taken(&p, t(2026, 3, 1, 2, 0) + Duration::days(d)))
            .collect();
        sets[0].keep_until = Some(KeepUntil::Forever);
        sets[0].keep_note = Some("audit 2026".into());
        sets[1].keep_until = Some(KeepUntil::Until(t(2026, 4, 10, 0, 0)));
        let now = t(2026, 3, 30, 12, 0);
        let d = decide_retention(&p, &sets, &[], now);
        assert_eq!(d.sets[0].kept_by.to_string(), "kept forever (audit 2026)");
        assert_eq!(d.sets[0].expires_at, None);
        assert_eq!(
            d.sets[1].kept_by.to_string(),
            "kept until 2026-04-10T00:00:00Z"
        );
        assert_eq!(d.sets[1].expires_at, Some(t(2026, 4, 10, 0, 0)));
        assert!(!d.sets[0].delete && !d.sets[1].delete);
        assert_eq!(d.deleted().count(), 30 - 2 - 7);

        // Count-based retention beside days: the last 10 stay.
        p.keep_last = Some(10);
        let d = decide_retention(&p, &sets, &[], now);
        assert_eq!(d.deleted().count(), 30 - 2 - 10);
        assert_eq!(d.sets[21].kept_by.to_string(), "last 10 sets");
        assert!(!d.sets[20].delete);
        assert!(d.sets[19].delete);
        assert_eq!(d.sets[19].kept_by.to_string(), "regular 7 days");

        // Once its time passed, the set kept until a time goes; released,
        // the one kept forever goes too.
        p.keep_last = None;
        let later = t(2026, 4, 10, 0, 0);
        pass(&p, &mut sets, later);
        assert!(sets.iter().any(|b| b.id.starts_with("20260301")));
        assert!(!sets.iter().any(|b| b.id.starts_with("20260302")));
        sets[0].keep_until = None;
        pass(&p, &mut sets, later);
        assert!(!sets.iter().any(|b| b.id.starts_with("20260301")));
    }

    #[test]
    fn the_recovery_base_stays_until_the_next_set_leaves_the_log_window() {
        let mut p = policy(&EVERY_DAY, 7);
        p.log_backup_enabled = true;
        p.log_retention_days = 7;
        let sets: Vec<BackupSet> = [0, 4, 8, 12]
            .iter()
            .map(|d| taken(&p, t(2026, 3, 1, 2, 0) + Duration::days(*d)))
            .collect();
        // On 14 March the window starts 7 March: the 5 March set is its base.
        let now = t(2026, 3, 14, 12, 0);
        let d = decide_retention(&p, &sets, &[], now);
        assert!(d.sets[0].delete);
        assert_eq!(d.sets[1].kept_by.to_string(), "pitr-base");
        assert!(!d.sets[1].delete);
        // It goes when the 9 March set leaves the window.
        let d = decide_retention(&p, &sets, &[], t(2026, 3, 16, 2, 6));
        assert!(d.sets[1].delete);
        assert_eq!(d.sets[2].kept_by.to_string(), "pitr-base");
    }

    #[test]
    fn several_rules_on_one_day_stamp_the_longest() {
        let mut p = sparse(t(2026, 3, 1, 0, 0));
        // 1 March 2026 is a Sunday and a month's first day.
        let stamp = p.rule_for(t(2026, 3, 1, 2, 0)).unwrap();
        assert_eq!(
            stamp,
            TakenUnder {
                rule: "month-ends".into(),
                retention_days: 365
            }
        );
        // 28 February is the month's last day (a Saturday, no other rule).
        assert_eq!(p.rule_for(t(2026, 2, 28, 2, 0)).unwrap().rule, "month-ends");
        // A Tuesday falls under no rule; with the advanced policy off, only
        // the backup days do.
        assert_eq!(p.rule_for(t(2026, 3, 3, 2, 0)), None);
        p.advanced_enabled = false;
        assert_eq!(p.rule_for(t(2026, 3, 1, 2, 0)), None);
        assert_eq!(p.rule_for(t(2026, 3, 2, 2, 0)).unwrap().rule, "regular");
    }
}
