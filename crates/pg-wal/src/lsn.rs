//! Typed WAL positions and identifiers. Reference: src/include/access/xlogdefs.h
//! (`XLogRecPtr`, `TimeLineID`, `XLogSegNo`) and src/backend/utils/adt/pg_lsn.c for the
//! textual `X/X` form.

use std::fmt;
use std::ops::{Add, Sub};
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::WalError;

/// A byte position in the WAL stream (`XLogRecPtr`).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl Lsn {
    /// `InvalidXLogRecPtr`: PostgreSQL never writes WAL at position zero.
    pub const INVALID: Lsn = Lsn(0);

    /// False for `InvalidXLogRecPtr` (zero).
    pub fn is_valid(self) -> bool {
        self != Lsn::INVALID
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

impl fmt::Debug for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Lsn({self})")
    }
}

impl FromStr for Lsn {
    type Err = WalError;

    /// Accepts what `pg_lsn` accepts: two groups of 1 to 8 hex digits separated by `/`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = || WalError::InvalidLsn(s.to_owned());
        let (hi, lo) = s.split_once('/').ok_or_else(invalid)?;
        let half = |part: &str| {
            if part.is_empty() || part.len() > 8 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(invalid());
            }
            u32::from_str_radix(part, 16).map_err(|_| invalid())
        };
        Ok(Lsn((u64::from(half(hi)?) << 32) | u64::from(half(lo)?)))
    }
}

impl Add<u64> for Lsn {
    type Output = Lsn;

    fn add(self, bytes: u64) -> Lsn {
        Lsn(self.0 + bytes)
    }
}

impl Sub<Lsn> for Lsn {
    type Output = u64;

    /// Distance in bytes; saturates at zero so "how far behind" never underflows.
    fn sub(self, other: Lsn) -> u64 {
        self.0.saturating_sub(other.0)
    }
}

impl Serialize for Lsn {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Lsn {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// A timeline (`TimeLineID`); a new one starts at every promotion or PITR.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TimelineId(pub u32);

impl fmt::Display for TimelineId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A WAL segment number (`XLogSegNo`): LSN divided by the segment size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SegmentNo(pub u64);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_matches_postgres() {
        assert_eq!(Lsn(0x16_B374_D848).to_string(), "16/B374D848");
        assert_eq!(Lsn(0).to_string(), "0/0");
        assert_eq!(Lsn(0x0100_0000).to_string(), "0/1000000");
        assert_eq!(format!("{:?}", Lsn(0x1_0000_0028)), "Lsn(1/28)");
    }

    #[test]
    fn parse_round_trips_and_rejects_garbage() {
        let lsn: Lsn = "16/B374D848".parse().unwrap();
        assert_eq!(lsn, Lsn(0x16_B374_D848));
        assert_eq!("0/1a".parse::<Lsn>().unwrap(), Lsn(0x1a));
        assert_eq!("FFFFFFFF/FFFFFFFF".parse::<Lsn>().unwrap(), Lsn(u64::MAX));
        for bad in [
            "",
            "16",
            "/1",
            "1/",
            "1/2/3",
            "G/0",
            "123456789/0",
            " 1/0",
            "1/-1",
        ] {
            assert!(bad.parse::<Lsn>().is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn arithmetic() {
        assert_eq!(Lsn(100) + 28, Lsn(128));
        assert_eq!(Lsn(128) - Lsn(100), 28);
        assert_eq!(Lsn(100) - Lsn(128), 0);
        assert!(Lsn(1) > Lsn::INVALID);
        assert!(!Lsn::INVALID.is_valid());
    }

    #[test]
    fn serde_forms() {
        assert_eq!(
            serde_json::to_string(&Lsn(0x16_B374_D848)).unwrap(),
            "\"16/B374D848\""
        );
        assert_eq!(
            serde_json::from_str::<Lsn>("\"0/3000028\"").unwrap(),
            Lsn(0x300_0028)
        );
        assert!(serde_json::from_str::<Lsn>("\"nope\"").is_err());
        assert_eq!(serde_json::to_string(&TimelineId(3)).unwrap(), "3");
        assert_eq!(
            serde_json::from_str::<TimelineId>("7").unwrap(),
            TimelineId(7)
        );
        assert_eq!(TimelineId(12).to_string(), "12");
    }
}
