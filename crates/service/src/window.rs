//! The check a restore to a point in time passes first: the time must lie in
//! the recovery window of what it restores from, the instance's own backups
//! or their copies in another region. Both paths word their refusals alike
//! and refuse with the same kinds ([`Refusal::NoLogBackup`] when nothing can
//! be recovered to a point in time, [`Refusal::RestoreTimeOutsideWindow`]
//! outside the window).

use chrono::{DateTime, Utc};

use crate::policy::{format_seconds, invalid, PolicyError, Refusal};

/// Whose recovery window a restore time is checked against.
#[derive(Debug, Clone, Copy)]
pub(crate) enum WindowOf<'a> {
    /// An instance's own backups and log in this region.
    Instance(&'a str),
    /// The copies of an instance's backups and log in another region.
    Copies { instance: &'a str, region: &'a str },
}

impl std::fmt::Display for WindowOf<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WindowOf::Instance(id) => write!(f, "instance {id}"),
            WindowOf::Copies { instance, region } => {
                write!(f, "the copies of instance {instance} in region {region}")
            }
        }
    }
}

/// Refuses `t` unless it lies in `window` (the result of
/// [`crate::recovery_window`], both ends included).
pub(crate) fn check_restore_time(
    window: Option<(DateTime<Utc>, DateTime<Utc>)>,
    t: DateTime<Utc>,
    of: WindowOf<'_>,
) -> Result<(), PolicyError> {
    let Some((begin, end)) = window else {
        return Err(invalid(
            Refusal::NoLogBackup,
            format!("{of} has no log backup covering any time (log backup off, or no backup with log after it yet): restore a backup set instead"),
        ));
    };
    if t < begin || t > end {
        return Err(invalid(
            Refusal::RestoreTimeOutsideWindow,
            format!(
                "RestoreTime {} is outside the recoverable window of {of}: {} to {}",
                format_seconds(t),
                format_seconds(begin),
                format_seconds(end)
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(h: u32, m: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 12, 6, h, m, 0).unwrap()
    }

    #[test]
    fn restore_time_against_window() {
        let window = Some((at(10, 0), at(12, 0)));
        let own = WindowOf::Instance("pgm-1");
        let copies = WindowOf::Copies {
            instance: "pgm-1",
            region: "eu",
        };
        // (window, time, whose, expected refusal, words the message must hold)
        let cases: &[(_, _, _, Option<Refusal>, &[&str])] = &[
            (window, at(10, 0), own, None, &[]),
            (window, at(11, 30), own, None, &[]),
            (window, at(12, 0), copies, None, &[]),
            (
                window,
                at(9, 59),
                own,
                Some(Refusal::RestoreTimeOutsideWindow),
                &[
                    "RestoreTime 2026-12-06T09:59:00Z",
                    "outside the recoverable window of instance pgm-1",
                    "2026-12-06T10:00:00Z to 2026-12-06T12:00:00Z",
                ],
            ),
            (
                window,
                at(12, 1),
                copies,
                Some(Refusal::RestoreTimeOutsideWindow),
                &["outside the recoverable window of the copies of instance pgm-1 in region eu"],
            ),
            (
                None,
                at(11, 0),
                own,
                Some(Refusal::NoLogBackup),
                &[
                    "instance pgm-1 has no log backup",
                    "restore a backup set instead",
                ],
            ),
            (
                None,
                at(11, 0),
                copies,
                Some(Refusal::NoLogBackup),
                &["the copies of instance pgm-1 in region eu has no log backup"],
            ),
        ];
        for (i, (window, t, of, code, words)) in cases.iter().enumerate() {
            let got = check_restore_time(*window, *t, *of);
            assert_eq!(got.as_ref().err().map(|e| e.kind), *code, "case {i}");
            if let Err(e) = got {
                for w in *words {
                    assert!(
                        e.message.contains(w),
                        "case {i}: {:?} lacks {w:?}",
                        e.message
                    );
                }
            }
        }
    }
}
