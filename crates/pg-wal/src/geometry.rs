//! WAL segment geometry and file naming. Reference: src/include/access/xlog_internal.h
//! (`XLogSegmentOffset`, `XLByteToSeg`, `XLogFileName`, `TLHistoryFileName`,
//! `IsValidWalSegSize`) and src/backend/utils/misc/guc.c for how sizes are printed.

use serde::{Deserialize, Serialize};

use crate::{Lsn, SegmentNo, TimelineId, WalError};

/// `XLOG_BLCKSZ`: the WAL page size. Builds with another value are not supported.
pub const XLOG_BLCKSZ: u64 = 8192;

const MIN_SEGMENT_SIZE: u64 = 1024 * 1024;
const MAX_SEGMENT_SIZE: u64 = 1024 * 1024 * 1024;
/// Segment numbers are split into a "log id" and a segment within it, each 4 GiB of WAL.
const BYTES_PER_XLOG_ID: u64 = 0x1_0000_0000;

/// The `wal_segment_size` of one cluster, fixed at initdb.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "RawGeometry")]
pub struct WalGeometry {
    segment_size: u64,
}

/// Unvalidated wire form, so a deserialized geometry is checked like `WalGeometry::new`.
#[derive(Deserialize)]
struct RawGeometry {
    segment_size: u64,
}

impl TryFrom<RawGeometry> for WalGeometry {
    type Error = WalError;

    fn try_from(raw: RawGeometry) -> Result<Self, Self::Error> {
        WalGeometry::new(raw.segment_size)
    }
}

impl Default for WalGeometry {
    fn default() -> Self {
        WalGeometry::DEFAULT
    }
}

impl WalGeometry {
    /// The initdb default: 16 MiB segments.
    pub const DEFAULT: WalGeometry = WalGeometry {
        segment_size: 16 * 1024 * 1024,
    };

    /// The geometry of a server with segments of `segment_size` bytes; refuses sizes PostgreSQL cannot have.
    pub fn new(segment_size: u64) -> Result<Self, WalError> {
        if segment_size.is_power_of_two()
            && (MIN_SEGMENT_SIZE..=MAX_SEGMENT_SIZE).contains(&segment_size)
        {
            Ok(WalGeometry { segment_size })
        } else {
            Err(WalError::InvalidSegmentSize(segment_size))
        }
    }

    /// Segment size in bytes.
    pub fn segment_size(&self) -> u64 {
        self.segment_size
    }

    /// The segment holding `lsn`.
    pub fn segment_of(&self, lsn: Lsn) -> SegmentNo {
        SegmentNo(lsn.0 / self.segment_size)
    }

    /// First LSN of segment `seg`.
    pub fn segment_start(&self, seg: SegmentNo) -> Lsn {
        Lsn(seg.0 * self.segment_size)
    }

    /// Offset of `lsn` within its segment.
    pub fn offset_in_segment(&self, lsn: Lsn) -> u64 {
        lsn.0 & (self.segment_size - 1)
    }

    fn segments_per_xlog_id(&self) -> u64 {
        BYTES_PER_XLOG_ID / self.segment_size
    }

    /// `XLogFileName`: timeline, log id and segment as three 8-digit upper-case hex fields.
    pub fn segment_file_name(&self, tli: TimelineId, seg: SegmentNo) -> String {
        let per_id = self.segments_per_xlog_id();
        format!("{:08X}{:08X}{:08X}", tli.0, seg.0 / per_id, seg.0 % per_id)
    }

    /// Inverse of [`segment_file_name`](Self::segment_file_name). Names PostgreSQL would not
    /// produce for this geometry (lower case, a segment field out of range) are rejected.
    pub fn parse_segment_file_name(&self, name: &str) -> Option<(TimelineId, SegmentNo)> {
        if name.len() != 24 || !name.bytes().all(is_upper_hex) {
            return None;
        }
        let field = |i: usize| u32::from_str_radix(&name[i * 8..(i + 1) * 8], 16).ok();
        let (tli, log, seg) = (field(0)?, field(1)?, field(2)?);
        let per_id = self.segments_per_xlog_id();
        if u64::from(seg) >= per_id {
            return None;
        }
        Some((
            TimelineId(tli),
            SegmentNo(u64::from(log) * per_id + u64::from(seg)),
        ))
    }
}

fn is_upper_hex(b: u8) -> bool {
    b.is_ascii_digit() || (b'A'..=b'F').contains(&b)
}

/// `TLHistoryFileName`: e.g. `00000002.history`.
pub fn history_file_name(tli: TimelineId) -> String {
    format!("{:08X}.history", tli.0)
}

/// The timeline of a history file name (`00000002.history`); `None` for any other name.
pub fn parse_history_file_name(name: &str) -> Option<TimelineId> {
    let hex = name.strip_suffix(".history")?;
    if hex.len() != 8 || !hex.bytes().all(is_upper_hex) {
        return None;
    }
    u32::from_str_radix(hex, 16).ok().map(TimelineId)
}

/// Parses a memory-unit GUC as `SHOW` prints it (`16MB`, `1GB`, `8kB`) into bytes. PostgreSQL
/// units are powers of 1024; a bare number is bytes, as `pg_settings.setting` reports
/// `wal_segment_size`.
pub fn parse_size_setting(s: &str) -> Result<u64, WalError> {
    let invalid = || WalError::InvalidSizeSetting(s.to_owned());
    let text = s.trim();
    let digits_end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(digits_end);
    let number: u64 = number.parse().map_err(|_| invalid())?;
    let multiplier: u64 = match unit.trim_start().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1 << 10,
        "mb" => 1 << 20,
        "gb" => 1 << 30,
        "tb" => 1 << 40,
        _ => return Err(invalid()),
    };
    number.checked_mul(multiplier).ok_or_else(invalid)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    #[test]
    fn geometry_validation() {
        assert_eq!(WalGeometry::DEFAULT.segment_size(), 16 * MIB);
        assert!(WalGeometry::new(MIB).is_ok());
        assert!(WalGeometry::new(1024 * MIB).is_ok());
        for bad in [0, MIB / 2, 3 * MIB, 2048 * MIB] {
            assert_eq!(
                WalGeometry::new(bad),
                Err(WalError::InvalidSegmentSize(bad))
            );
        }
    }

    #[test]
    fn segment_arithmetic() {
        let g = WalGeometry::DEFAULT;
        let lsn = Lsn(0x16_B374_D848);
        assert_eq!(g.segment_of(lsn), SegmentNo(0x16B3));
        assert_eq!(g.segment_start(SegmentNo(0x16B3)), Lsn(0x16_B300_0000));
        assert_eq!(g.offset_in_segment(lsn), 0x74_D848);
        let g64 = WalGeometry::new(64 * MIB).unwrap();
        assert_eq!(g64.segment_of(Lsn(0x1_0400_0000)), SegmentNo(0x41));
    }

    #[test]
    fn segment_file_names() {
        let g = WalGeometry::DEFAULT;
        let name = g.segment_file_name(TimelineId(1), SegmentNo(0x16B3));
        assert_eq!(name, "0000000100000016000000B3");
        assert_eq!(
            g.parse_segment_file_name(&name),
            Some((TimelineId(1), SegmentNo(0x16B3)))
        );
        // With 1 GiB segments there are only 4 segments per log id.
        let g1g = WalGeometry::new(1024 * MIB).unwrap();
        assert_eq!(
            g1g.segment_file_name(TimelineId(2), SegmentNo(9)),
            "000000020000000200000001"
        );
        assert_eq!(
            g1g.parse_segment_file_name("000000020000000200000001"),
            Some((TimelineId(2), SegmentNo(9)))
        );
        assert_eq!(
            g1g.parse_segment_file_name("000000020000000200000004"),
            None
        );
        for bad in [
            "0000000100000016000000b3",
            "0000000100000016000000B",
            "0000000100000016000000B3.partial",
            "00000001.history",
            "0000000100000016000000G3",
        ] {
            assert_eq!(g.parse_segment_file_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn history_file_names() {
        assert_eq!(history_file_name(TimelineId(2)), "00000002.history");
        assert_eq!(history_file_name(TimelineId(0x1A)), "0000001A.history");
        assert_eq!(
            parse_history_file_name("0000001A.history"),
            Some(TimelineId(0x1A))
        );
        for bad in [
            "0000001a.history",
            "1A.history",
            "0000001A.histor",
            "0000001A",
        ] {
            assert_eq!(parse_history_file_name(bad), None, "{bad}");
        }
    }

    /// One rule for every memory-unit setting Strata reads (`wal_segment_size`,
    /// `segment_size`, ...): units are PostgreSQL's powers of 1024, any case, optional space.
    #[test]
    fn size_settings() {
        let cases: &[(&str, Option<u64>)] = &[
            ("16MB", Some(16 * MIB)),
            ("1GB", Some(1024 * MIB)),
            ("64MB", Some(64 * MIB)),
            ("8kB", Some(8192)),
            ("8KB", Some(8192)),
            ("16777216", Some(16 * MIB)),
            ("8192", Some(8192)),
            (" 2 TB ", Some(2 << 40)),
            ("512B", Some(512)),
            ("0", Some(0)),
            ("", None),
            ("MB", None),
            ("16XB", None),
            ("1 furlong", None),
            ("-1MB", None),
            ("1.5GB", None),
            ("99999999999999999999TB", None),
            // Fits in u64 as a number, overflows once multiplied by the unit.
            ("17179869184TB", None),
        ];
        for &(text, want) in cases {
            assert_eq!(parse_size_setting(text).ok(), want, "{text:?}");
        }
    }

    #[test]
    fn geometry_serde_validates() {
        let json = serde_json::to_string(&WalGeometry::DEFAULT).unwrap();
        assert_eq!(json, "{\"segment_size\":16777216}");
        assert_eq!(
            serde_json::from_str::<WalGeometry>(&json).unwrap(),
            WalGeometry::DEFAULT
        );
        assert!(serde_json::from_str::<WalGeometry>("{\"segment_size\":12345}").is_err());
    }
}
