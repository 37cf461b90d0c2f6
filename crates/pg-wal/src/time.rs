//! PostgreSQL `TimestampTz`: signed microseconds since 2000-01-01 00:00:00 UTC.
//! Reference: src/include/datatype/timestamp.h (`POSTGRES_EPOCH_JDATE`, `DT_NOBEGIN`,
//! `DT_NOEND`).

use chrono::{DateTime, TimeDelta, Utc};

/// Seconds between the Unix epoch and PostgreSQL's 2000-01-01 epoch.
const PG_EPOCH_UNIX_SECONDS: i64 = 946_684_800;

fn pg_epoch() -> DateTime<Utc> {
    DateTime::from_timestamp(PG_EPOCH_UNIX_SECONDS, 0).unwrap_or(DateTime::<Utc>::UNIX_EPOCH)
}

/// Values beyond chrono's range (including PostgreSQL's `-infinity`/`infinity`, which are
/// `i64::MIN`/`i64::MAX`) saturate to the earliest/latest representable instant.
pub fn from_pg_micros(us: i64) -> DateTime<Utc> {
    pg_epoch()
        .checked_add_signed(TimeDelta::microseconds(us))
        .unwrap_or(if us < 0 {
            DateTime::<Utc>::MIN_UTC
        } else {
            DateTime::<Utc>::MAX_UTC
        })
}

/// Sub-microsecond precision is truncated. Every chrono instant fits in a `TimestampTz`;
/// the saturation only guards the arithmetic.
pub fn to_pg_micros(t: DateTime<Utc>) -> i64 {
    let delta = t.signed_duration_since(pg_epoch());
    delta
        .num_microseconds()
        .unwrap_or(if delta < TimeDelta::zero() {
            i64::MIN
        } else {
            i64::MAX
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{SubsecRound, TimeZone};

    #[test]
    fn epoch_and_round_trip() {
        assert_eq!(
            from_pg_micros(0),
            Utc.with_ymd_and_hms(2000, 1, 1, 0, 0, 0).unwrap()
        );
        // 2024-05-01 12:34:56.789012 UTC
        let t = Utc.with_ymd_and_hms(2024, 5, 1, 12, 34, 56).unwrap()
            + TimeDelta::microseconds(789_012);
        let us = to_pg_micros(t);
        assert_eq!(us, 767_882_096_789_012);
        assert_eq!(from_pg_micros(us), t);
        assert_eq!(
            from_pg_micros(-1),
            Utc.with_ymd_and_hms(1999, 12, 31, 23, 59, 59).unwrap()
                + TimeDelta::microseconds(999_999)
        );
    }

    #[test]
    fn infinities_saturate() {
        assert_eq!(from_pg_micros(i64::MAX), DateTime::<Utc>::MAX_UTC);
        assert_eq!(from_pg_micros(i64::MIN), DateTime::<Utc>::MIN_UTC);
        // chrono's range fits in PostgreSQL's, so its extremes round-trip.
        for t in [DateTime::<Utc>::MAX_UTC, DateTime::<Utc>::MIN_UTC] {
            assert_eq!(from_pg_micros(to_pg_micros(t)), t.trunc_subsecs(6));
        }
    }
}
