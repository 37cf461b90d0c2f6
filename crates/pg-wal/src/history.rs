//! Timeline history files (`0000000N.history`). Reference: src/backend/access/transam/timeline.c
//! (`readTimeLineHistory`, `tliOfPointInHistory`, `tliSwitchPoint`).
//!
//! Each non-comment line reads `<parent tli>\t<switchpoint X/X>\t<reason>`: WAL of the
//! parent timeline is valid up to (not including) the switchpoint, after which the next
//! line's timeline (or, for the last line, the file's own timeline) takes over. Lines are
//! oldest first and timeline ids must increase.

use crate::{Lsn, TimelineId, WalError};

/// One line of a timeline history file: an ancestor timeline and where it was left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimelineHistoryEntry {
    /// The ancestor timeline.
    pub timeline: TimelineId,
    /// First LSN that is no longer on `timeline`.
    pub switchpoint: Lsn,
    /// Why the switch happened, as PostgreSQL wrote it (e.g. "no recovery target specified").
    pub reason: String,
}

/// A timeline history file (`NNNNNNNN.history`): how a timeline descends from its ancestors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimelineHistory {
    /// The timeline this history file belongs to (the newest one).
    pub timeline: TimelineId,
    /// Ancestors, oldest first.
    pub entries: Vec<TimelineHistoryEntry>,
}

impl TimelineHistory {
    /// Parses the history file of timeline `tli` (PostgreSQL's `readTimeLineHistory`).
    pub fn parse(tli: TimelineId, text: &str) -> Result<Self, WalError> {
        let mut entries: Vec<TimelineHistoryEntry> = Vec::new();
        for (index, raw) in text.lines().enumerate() {
            let invalid = |reason: &str| WalError::InvalidHistory {
                timeline: tli.0,
                line: index + 1,
                reason: reason.to_owned(),
            };
            let line = raw.trim_start();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            // The reason is free text and may itself contain tabs or spaces.
            let mut fields = line.splitn(3, ['\t', ' ']);
            let parent = fields
                .next()
                .and_then(|t| t.parse::<u32>().ok())
                .ok_or_else(|| invalid("expected a numeric timeline id"))?;
            let switchpoint = fields
                .next()
                .map(str::trim)
                .and_then(|lsn| lsn.parse::<Lsn>().ok())
                .ok_or_else(|| invalid("expected a switchpoint like 0/3000000"))?;
            let reason = fields.next().unwrap_or("").trim().to_owned();

            let parent = TimelineId(parent);
            if let Some(last) = entries.last() {
                if parent <= last.timeline {
                    return Err(invalid("timeline ids must be in increasing sequence"));
                }
                if switchpoint < last.switchpoint {
                    return Err(invalid("switchpoints must not decrease"));
                }
            }
            if parent >= tli {
                return Err(invalid(
                    "ancestor timeline must be lower than the file's own",
                ));
            }
            entries.push(TimelineHistoryEntry {
                timeline: parent,
                switchpoint,
                reason,
            });
        }
        Ok(TimelineHistory {
            timeline: tli,
            entries,
        })
    }

    /// The timeline that contains `lsn` when following this history (parents up to their
    /// switchpoints, then this timeline). A switchpoint itself belongs to the child.
    pub fn timeline_at(&self, lsn: Lsn) -> TimelineId {
        self.entries
            .iter()
            .find(|entry| lsn < entry.switchpoint)
            .map_or(self.timeline, |entry| entry.timeline)
    }

    /// Switchpoint at which `parent` ended, if `parent` is an ancestor.
    pub fn switchpoint_of(&self, parent: TimelineId) -> Option<Lsn> {
        self.entries
            .iter()
            .find(|entry| entry.timeline == parent)
            .map(|entry| entry.switchpoint)
    }

    /// Ancestor timelines, oldest first (the file's own timeline is not included).
    pub fn ancestors(&self) -> impl Iterator<Item = TimelineId> + '_ {
        self.entries.iter().map(|entry| entry.timeline)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // As PostgreSQL writes it after two promotions (timeline.c, writeTimeLineHistory).
    const TLI3: &str = "1\t0/3000158\tno recovery target specified\n\n\
                        2\t0/5000000\tbefore 2024-05-01 10:00:00+00\n";

    #[test]
    fn parses_postgres_output() {
        let h = TimelineHistory::parse(TimelineId(3), TLI3).unwrap();
        assert_eq!(h.timeline, TimelineId(3));
        assert_eq!(
            h.entries,
            vec![
                TimelineHistoryEntry {
                    timeline: TimelineId(1),
                    switchpoint: Lsn(0x300_0158),
                    reason: "no recovery target specified".into(),
                },
                TimelineHistoryEntry {
                    timeline: TimelineId(2),
                    switchpoint: Lsn(0x500_0000),
                    reason: "before 2024-05-01 10:00:00+00".into(),
                },
            ]
        );
        assert_eq!(
            h.ancestors().collect::<Vec<_>>(),
            vec![TimelineId(1), TimelineId(2)]
        );
    }

    #[test]
    fn timeline_lookup_follows_switchpoints() {
        let h = TimelineHistory::parse(TimelineId(3), TLI3).unwrap();
        assert_eq!(h.timeline_at(Lsn(0)), TimelineId(1));
        assert_eq!(h.timeline_at(Lsn(0x300_0157)), TimelineId(1));
        assert_eq!(h.timeline_at(Lsn(0x300_0158)), TimelineId(2));
        assert_eq!(h.timeline_at(Lsn(0x4FF_FFFF)), TimelineId(2));
        assert_eq!(h.timeline_at(Lsn(0x500_0000)), TimelineId(3));
        assert_eq!(h.timeline_at(Lsn(u64::MAX)), TimelineId(3));
        assert_eq!(h.switchpoint_of(TimelineId(1)), Some(Lsn(0x300_0158)));
        assert_eq!(h.switchpoint_of(TimelineId(2)), Some(Lsn(0x500_0000)));
        assert_eq!(h.switchpoint_of(TimelineId(3)), None);
    }

    #[test]
    fn comments_blank_lines_and_missing_reason() {
        let h = TimelineHistory::parse(TimelineId(2), "# comment\n  \n1\t0/16B3E20\n").unwrap();
        assert_eq!(h.entries.len(), 1);
        assert_eq!(h.entries[0].reason, "");
        let empty = TimelineHistory::parse(TimelineId(1), "").unwrap();
        assert_eq!(empty.timeline_at(Lsn(42)), TimelineId(1));
        assert_eq!(empty.ancestors().count(), 0);
    }

    #[test]
    fn rejects_malformed_histories() {
        let cases = [
            "x\t0/1\treason",
            "1\tnot-an-lsn\treason",
            "1\n",
            "2\t0/1\ta\n1\t0/2\tb\n",
            "1\t0/5\ta\n2\t0/4\tb\n",
            "3\t0/5\ta\n",
        ];
        for text in cases {
            let err = TimelineHistory::parse(TimelineId(3), text).unwrap_err();
            assert!(
                matches!(err, WalError::InvalidHistory { timeline: 3, .. }),
                "{text:?}: {err}"
            );
        }
    }
}
