//! Log backups as files: the archived WAL segments of an instance in a
//! time range, as `DescribeBinlogFiles` and `DescribeLogBackupFiles` list
//! them (and `DescribeCrossRegionLogBackupFiles` their copies). A segment's
//! time range is that of the commits it holds (when it was stored, for one
//! without commits). Reference: src/backend/access/transam/xlogarchive.c
//! (what an archived segment is).

use chrono::{DateTime, Utc};
use serde_json::{json, Map, Value};
use strata_catalog::WalSegmentRow;
use strata_service::policy::format_seconds;

use crate::error::ApiResult;
use crate::params::{page, Params};
use crate::ApiState;

type Fields = Map<String, Value>;

/// When a segment's log begins and ends: its first and last commit, or
/// when it was stored when it holds none.
pub fn log_times(w: &WalSegmentRow) -> (DateTime<Utc>, DateTime<Utc>) {
    (
        w.first_commit.unwrap_or(w.stored_at),
        w.last_commit.unwrap_or(w.stored_at),
    )
}

/// Whether a segment's log overlaps `start..=end`.
pub fn overlaps(w: &WalSegmentRow, start: DateTime<Utc>, end: DateTime<Utc>) -> bool {
    let (begin, finish) = log_times(w);
    finish >= start && begin <= end
}

/// WAL segments as the API lists them: a complete segment supersedes the
/// partial one of the same name.
pub fn listed_wal_segments(rows: Vec<WalSegmentRow>) -> Vec<WalSegmentRow> {
    let complete: std::collections::HashSet<(u32, String)> = rows
        .iter()
        .filter(|w| !w.partial)
        .map(|w| (w.timeline.0, w.segment.clone()))
        .collect();
    rows.into_iter()
        .filter(|w| !w.partial || !complete.contains(&(w.timeline.0, w.segment.clone())))
        .collect()
}

/// Which of the two actions lists the files: they share the request and
/// the paging answer; the binlog one also says each file's checksum, host
/// instance and upload state, and accepts smaller pages.
#[derive(Clone, Copy, PartialEq)]
pub enum Listing {
    Binlog,
    LogBackup,
}

/// The log files of `DBInstanceId` between `StartTime` and `EndTime`
/// (both required), one page of them, with the page and total counts and
/// the total size of every file in the range.
pub fn describe(state: &ApiState, p: &Params, listing: Listing) -> ApiResult<Fields> {
    let svc = &state.service;
    let inst = svc.instance(p.required("DBInstanceId")?)?;
    let (start, end) = p.required_period()?;
    let sizes: &[i64] = match listing {
        Listing::Binlog => &[30, 100],
        Listing::LogBackup => &[30, 1000],
    };
    let (number, size) = p.paging(sizes, true)?;
    let rows = listed_wal_segments(svc.wal_segments(&inst.id)?);
    let matching: Vec<&WalSegmentRow> = rows.iter().filter(|w| overlaps(w, start, end)).collect();
    let total_size: u64 = matching.iter().map(|w| w.size).sum();
    let items: Vec<Value> = page(&matching, number, size)
        .into_iter()
        .map(|w| file_fields(state, w, listing))
        .collect();
    Ok(crate::cross_region::obj(json!({
        "Items": {"BinLogFile": items},
        "PageNumber": number,
        "PageRecordCount": items.len(),
        "TotalRecordCount": matching.len(),
        "TotalFileSize": total_size,
    })))
}

fn file_fields(state: &ApiState, w: &WalSegmentRow, listing: Listing) -> Value {
    let file = if w.partial {
        format!("{}.partial", w.segment)
    } else {
        w.segment.clone()
    };
    let (link, expires) = state.links.sign(
        &format!("/download/wal/{}/{file}", w.instance_id),
        Utc::now(),
    );
    let (begin, end) = log_times(w);
    let mut item = json!({
        "DownloadLink": link,
        "IntranetDownloadLink": link,
        "LinkExpiredTime": format_seconds(expires),
        "LogBeginTime": format_seconds(begin),
        "LogEndTime": format_seconds(end),
        "FileSize": w.size,
        "StrataTimeline": w.timeline.0,
        "StrataBeginLsn": w.begin_lsn.to_string(),
        "StrataEndLsn": w.end_lsn.to_string(),
        "StrataCommitCount": w.commit_count,
    });
    let m = item.as_object_mut().expect("an object");
    match listing {
        Listing::Binlog => {
            m.insert("LogFileName".into(), json!(file));
            m.insert("Checksum".into(), json!(w.checksum));
            m.insert("HostInstanceID".into(), json!(w.instance_id));
            m.insert(
                "RemoteStatus".into(),
                json!(if w.partial { "Uploading" } else { "Completed" }),
            );
        }
        // RDS names neither the file nor its checksum here.
        Listing::LogBackup => {
            m.insert("StrataLogFileName".into(), json!(file));
            m.insert("StrataChecksum".into(), json!(w.checksum));
            m.insert("StrataPartial".into(), json!(w.partial));
        }
    }
    item
}
