//! The parameters of one RPC call, with RDS's spellings of booleans,
//! integers and times, and the error codes RDS gives for bad ones.

use chrono::{DateTime, NaiveDateTime, Utc};

use crate::error::{quoted, ApiError, ApiResult};

/// A time given in a request.
type Time = DateTime<Utc>;

/// A request's parameters, as signed.
pub struct Params(Vec<(String, String)>);

impl Params {
    /// Parameters from decoded name/value pairs.
    pub fn new(pairs: Vec<(String, String)>) -> Self {
        Params(pairs)
    }

    /// The value of `name`; empty values count as absent, as in RDS.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.trim().is_empty())
    }

    /// The comma-separated values of `name` (trimmed, empty ones dropped, each once in the
    /// order first given), or `None` when absent. More than `max` values are refused with
    /// error `code` before any is looked at, so a long list costs nothing downstream.
    pub fn list(&self, name: &str, max: usize, code: &str) -> ApiResult<Option<Vec<&str>>> {
        let Some(value) = self.get(name) else {
            return Ok(None);
        };
        let mut out: Vec<&str> = Vec::new();
        let values = value.split(',').map(str::trim).filter(|v| !v.is_empty());
        for (n, v) in values.enumerate() {
            if n >= max {
                return Err(ApiError::bad(
                    code,
                    format!("{name} lists at most {max} values separated by commas"),
                ));
            }
            if !out.contains(&v) {
                out.push(v);
            }
        }
        Ok(Some(out))
    }

    /// The value of `name` as sent, empty included (for parameters where
    /// empty has a meaning, such as "off").
    pub fn raw(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The members of a list of objects as the SDK flattens it
    /// (`Name.1.Field=value`): `(index, field, value)` in the order sent.
    pub fn flattened<'a>(&'a self, name: &str) -> Vec<(&'a str, &'a str, &'a str)> {
        let prefix = format!("{name}.");
        self.0
            .iter()
            .filter_map(|(k, v)| {
                let (index, field) = k.strip_prefix(&prefix)?.split_once('.')?;
                Some((index, field, v.as_str()))
            })
            .collect()
    }

    /// The value of `name`, or a `MissingParameter` error.
    pub fn required(&self, name: &str) -> ApiResult<&str> {
        self.get(name).ok_or_else(|| ApiError::missing(name))
    }

    /// `True`/`False`, `true`/`false`, `1`/`0`, `Enable`/`Disable(d)`.
    pub fn bool(&self, name: &str) -> ApiResult<Option<bool>> {
        let Some(v) = self.get(name) else {
            return Ok(None);
        };
        match v.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "enable" | "enabled" | "on" => Ok(Some(true)),
            "false" | "0" | "disable" | "disabled" | "off" => Ok(Some(false)),
            _ => Err(ApiError::bad(
                &format!("Invalid{name}.Malformed"),
                format!("{name} must be True or False (or 1/0), got {}", quoted(v)),
            )),
        }
    }

    /// An integer parameter, if given.
    pub fn int(&self, name: &str) -> ApiResult<Option<i64>> {
        self.get(name)
            .map(|v| {
                v.trim().parse().map_err(|_| {
                    ApiError::bad(
                        &format!("Invalid{name}.Malformed"),
                        format!("{name} must be an integer, got {}", quoted(v)),
                    )
                })
            })
            .transpose()
    }

    /// A UTC time as `yyyy-MM-ddTHH:mmZ` or `yyyy-MM-ddTHH:mm:ssZ`.
    pub fn time(&self, name: &str) -> ApiResult<Option<DateTime<Utc>>> {
        let Some(v) = self.get(name) else {
            return Ok(None);
        };
        parse_time(v).map(Some).ok_or_else(|| {
            ApiError::bad(
                &format!("Invalid{name}.Format"),
                format!("{name} must be a UTC time written yyyy-MM-ddTHH:mmZ or yyyy-MM-ddTHH:mm:ssZ, got {}", quoted(v)),
            )
        })
    }

    /// `StartTime` and `EndTime`, each optional; refused when both are given
    /// and the end is not after the start.
    pub fn period(&self) -> ApiResult<(Option<Time>, Option<Time>)> {
        let start = self.time("StartTime")?;
        let end = self.time("EndTime")?;
        if let (Some(s), Some(e)) = (start, end) {
            if e <= s {
                return Err(ApiError::bad(
                    "InvalidParameterCombination",
                    "EndTime must be later than StartTime.",
                ));
            }
        }
        Ok((start, end))
    }

    /// Like [`Params::period`] with both times required.
    pub fn required_period(&self) -> ApiResult<(Time, Time)> {
        self.required("StartTime")?;
        self.required("EndTime")?;
        let (start, end) = self.period()?;
        Ok((start.expect("required above"), end.expect("required above")))
    }

    /// `PageNumber` (≥ 1, default 1) and `PageSize` (one of `sizes`, or any
    /// value in `sizes[0]..=sizes[1]` when `range` is set).
    pub fn paging(&self, sizes: &[i64], range: bool) -> ApiResult<(usize, usize)> {
        let number = self.int("PageNumber")?.unwrap_or(1);
        if number < 1 {
            return Err(ApiError::bad(
                "InvalidPageNumber.Malformed",
                format!("PageNumber must be 1 or more, got {number}"),
            ));
        }
        let size = self.int("PageSize")?.unwrap_or(sizes[0]);
        let ok = if range {
            (sizes[0]..=sizes[sizes.len() - 1]).contains(&size)
        } else {
            sizes.contains(&size)
        };
        if !ok {
            let allowed = if range {
                format!("{} to {}", sizes[0], sizes[sizes.len() - 1])
            } else {
                sizes
                    .iter()
                    .map(|s| s.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            return Err(ApiError::bad(
                "InvalidPageSize.Malformed",
                format!("PageSize must be {allowed}, got {size}"),
            ));
        }
        Ok((number as usize, size as usize))
    }
}

impl Params {
    /// `PageIndex` (≥ 1) and `PageSize` (1 to `max`) as the meta lists
    /// take them: both checked when given, and paging only when both are
    /// (RDS: each "takes effect only when specified together" with the
    /// other).
    pub fn index_paging(&self, max: i64) -> ApiResult<Option<(usize, usize)>> {
        let index = self.int("PageIndex")?;
        if let Some(i) = index.filter(|i| *i < 1) {
            return Err(ApiError::bad(
                "InvalidPageIndex.Malformed",
                format!("PageIndex must be 1 or more, got {i}"),
            ));
        }
        let size = self.int("PageSize")?;
        if let Some(s) = size.filter(|s| !(1..=max).contains(s)) {
            return Err(ApiError::bad(
                "InvalidPageSize.Malformed",
                format!("PageSize must be 1 to {max}, got {s}"),
            ));
        }
        Ok(index.zip(size).map(|(i, s)| (i as usize, s as usize)))
    }
}

pub fn parse_time(v: &str) -> Option<DateTime<Utc>> {
    let v = v.trim();
    ["%Y-%m-%dT%H:%M:%SZ", "%Y-%m-%dT%H:%MZ"]
        .iter()
        .find_map(|f| NaiveDateTime::parse_from_str(v, f).ok())
        .map(|t| t.and_utc())
}

/// One page of `items` (1-based page number).
pub fn page<T: Clone>(items: &[T], number: usize, size: usize) -> Vec<T> {
    items
        .iter()
        .skip((number - 1).saturating_mul(size))
        .take(size)
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(pairs: &[(&str, &str)]) -> Params {
        Params::new(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn booleans_in_every_spelling() {
        for (v, want) in [
            ("True", true),
            ("true", true),
            ("1", true),
            ("False", false),
            ("0", false),
            ("Disabled", false),
        ] {
            assert_eq!(p(&[("X", v)]).bool("X").unwrap(), Some(want), "{v}");
        }
        assert_eq!(
            p(&[("X", "yes please")]).bool("X").unwrap_err().code,
            "InvalidX.Malformed"
        );
        assert_eq!(p(&[]).bool("X").unwrap(), None);
    }

    #[test]
    fn lists_are_bounded_and_each_value_taken_once() {
        let code = "InvalidDBInstanceId.Malformed";
        assert_eq!(p(&[]).list("DBInstanceId", 30, code).unwrap(), None);
        assert_eq!(
            p(&[("DBInstanceId", " pg1, ,pg2,pg1 ,pg3,")])
                .list("DBInstanceId", 30, code)
                .unwrap(),
            Some(vec!["pg1", "pg2", "pg3"])
        );
        // Thirty values pass, the thirty-first is refused even when it repeats one: a long
        // list of one real id costs nothing downstream.
        let thirty = vec!["pg1"; 30].join(",");
        assert_eq!(
            p(&[("DBInstanceId", &thirty)])
                .list("DBInstanceId", 30, code)
                .unwrap(),
            Some(vec!["pg1"])
        );
        let many = vec!["pg1"; 500_000].join(",");
        let err = p(&[("DBInstanceId", &many)])
            .list("DBInstanceId", 30, code)
            .unwrap_err();
        assert_eq!(err.code, code);
        assert!(err.message.contains("at most 30"), "{}", err.message);
    }

    #[test]
    fn times_and_paging() {
        assert_eq!(
            parse_time("2026-11-25T10:00Z").unwrap().to_rfc3339(),
            "2026-11-25T10:00:00+00:00"
        );
        assert_eq!(
            parse_time("2026-11-25T10:00:07Z").unwrap().to_rfc3339(),
            "2026-11-25T10:00:07+00:00"
        );
        assert!(parse_time("2026-11-25 10:00").is_none());
        assert_eq!(
            p(&[("StartTime", "yesterday")])
                .time("StartTime")
                .unwrap_err()
                .code,
            "InvalidStartTime.Format"
        );
        assert_eq!(
            p(&[("PageSize", "50")])
                .paging(&[30, 50, 100], false)
                .unwrap(),
            (1, 50)
        );
        assert_eq!(
            p(&[("PageSize", "40")])
                .paging(&[30, 50, 100], false)
                .unwrap_err()
                .code,
            "InvalidPageSize.Malformed"
        );
        assert_eq!(
            p(&[("PageSize", "40")]).paging(&[30, 100], true).unwrap(),
            (1, 40)
        );
        assert_eq!(
            p(&[("PageNumber", "0")])
                .paging(&[30], false)
                .unwrap_err()
                .code,
            "InvalidPageNumber.Malformed"
        );
        assert_eq!(page(&[1, 2, 3, 4, 5], 2, 2), vec![3, 4]);
        let both = p(&[("PageIndex", "3"), ("PageSize", "20")]);
        assert_eq!(both.index_paging(1000).unwrap(), Some((3, 20)));
        assert_eq!(p(&[("PageSize", "20")]).index_paging(1000).unwrap(), None);
        for (pairs, code) in [
            (
                &[("PageIndex", "0"), ("PageSize", "5")][..],
                "InvalidPageIndex.Malformed",
            ),
            (&[("PageIndex", "two")][..], "InvalidPageIndex.Malformed"),
            (&[("PageSize", "1001")][..], "InvalidPageSize.Malformed"),
            (
                &[("PageIndex", "1"), ("PageSize", "0")][..],
                "InvalidPageSize.Malformed",
            ),
        ] {
            assert_eq!(
                p(pairs).index_paging(1000).unwrap_err().code,
                code,
                "{pairs:?}"
            );
        }
        assert!(page(&[1, 2, 3], 3, 2).is_empty());
    }
}
