//! The Storage tab: what an instance's backups store, its free quota, the
//! bytes above it and the billable GB-hours, from the usage samples the
//! scheduler records (`strata_service::usage`; the attribution rule is in
//! docs/DESIGN.md). Before the first sample one is measured on the spot.
//! Cross-region copies are a figure of their own, outside the total and the
//! quota.
//! The chart is an inline SVG drawn here: data and log stacked, the free
//! quota as a line.

use std::fmt::Write;

use chrono::{DateTime, Utc};
use maud::{html, Markup};
use strata_catalog::UsageSample;
use strata_service::Service;

use crate::layout::{self, bytes};

/// One moment of the history: bytes stored and the quota from then on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    pub at: DateTime<Utc>,
    pub data: u64,
    pub log: u64,
    pub quota: u64,
}

impl From<&UsageSample> for Point {
    fn from(s: &UsageSample) -> Point {
        Point {
            at: s.at,
            data: s.data_bytes,
            log: s.wal_bytes,
            quota: s.quota_bytes,
        }
    }
}

/// The newest figures of an instance (the Instances list's "Storage used").
pub fn current(service: &Service, instance_id: &str) -> Result<UsageSample, strata_api::ApiError> {
    Ok(service.current_usage(instance_id)?)
}

/// The tab's body: figures, then the chart.
pub fn tab(service: &Service, instance_id: &str, now: DateTime<Utc>) -> Markup {
    let report = match service.usage_report(instance_id, None, None) {
        Ok(r) => r,
        Err(e) => return layout::error_box("Storage could not be read:", &e.into()),
    };
    let c = &report.current;
    let points: Vec<Point> = report.samples.iter().map(Point::from).collect();
    let chart = chart(&downsample(&points, 400), now);
    let gb_hours = format!("{:.3}", report.billable_gb_hours);
    let cross_region = c.cross_region_bytes.map_or("unknown".to_string(), bytes);
    html! {
        div.figures #usage-figures {
            div.figure { span.label { "Data backups" } strong #usage-data { (bytes(c.data_bytes)) } span.muted { "stored; " (bytes(c.logical_bytes)) " of data in the sets" } }
            div.figure { span.label { "Log backups" } strong #usage-log { (bytes(c.wal_bytes)) } span.muted { "WAL stored" } }
            div.figure { span.label { "Total" } strong #usage-total { (bytes(c.stored_bytes())) } span.muted { "after deduplication and compression" } }
            div.figure { span.label { "Cross-region copies" } strong #usage-cross-region { (cross_region) } span.muted { "in other regions' repositories; not counted against the free quota" } }
            div.figure { span.label { "Free quota" } strong #usage-quota data-bytes=(c.quota_bytes) { (bytes(c.quota_bytes)) } span.muted { (quota_rule(&report.quota)) } }
            div.figure { span.label { "Above the quota" } strong #usage-excess data-bytes=(c.excess_bytes()) { (bytes(c.excess_bytes())) } span.muted #usage-gb-hours { (gb_hours) " GB-hours billable since " (layout::time(report.from)) } }
        }
        div.card.chartcard {
            div.legend {
                span.key.data { "Data backups" }
                span.key.log { "Log backups" }
                span.key.quota { "Free quota" }
            }
            (layout::svg(chart))
            p.hint {
                "Bytes stored for this instance at each usage sample (taken by the scheduler at least every sampling interval, and after backups, deletions and garbage collection), "
                "with the free quota then. Bytes above the quota, held until the next sample, add up to the billable GB-hours (1 GB = 2^30 bytes). "
                "Last sample: " (layout::time(c.at)) "."
            }
        }
    }
}

fn quota_rule(q: &strata_service::FreeQuota) -> String {
    match q {
        strata_service::FreeQuota::PercentOfDatabase(p) => {
            format!("{p}% of the database size (newest backup set)")
        }
        strata_service::FreeQuota::Bytes(_) => "fixed for this instance".into(),
    }
}

/// At most `max` points: the first, then the last of each equal slice of
/// time after it.
pub fn downsample(points: &[Point], max: usize) -> Vec<Point> {
    if points.len() <= max || max < 3 {
        return points.to_vec();
    }
    let (first, last) = (points[0].at, points[points.len() - 1].at);
    let span = (last - first).num_milliseconds().max(1) as f64;
    let mut out: Vec<Point> = Vec::with_capacity(max);
    out.push(points[0]);
    let mut bucket = usize::MAX;
    for p in &points[1..] {
        let b = (((p.at - first).num_milliseconds() as f64 / span) * (max - 2) as f64) as usize;
        if b == bucket {
            *out.last_mut().expect("a point per bucket") = *p;
        } else {
            out.push(*p);
            bucket = b;
        }
    }
    out
}

/// Round axis steps: 1, 2 or 5 times a power of ten of B, KiB, MiB, …,
/// below 1024 of the unit; returns the step in bytes.
pub fn nice_step(max: u64, ticks: u64) -> u64 {
    let raw = (max / ticks.max(1)).max(1);
    let mut unit = 1u64;
    while raw / unit >= 1024 {
        unit *= 1024;
    }
    [1, 2, 5, 10, 20, 50, 100, 200, 500, 1024]
        .into_iter()
        .map(|m| m * unit)
        .find(|s| *s >= raw)
        .unwrap_or(1024 * unit)
}

const W: f64 = 960.0;
const H: f64 = 280.0;
const LEFT: f64 = 72.0;
const RIGHT: f64 = 16.0;
const TOP: f64 = 14.0;
const BOTTOM: f64 = 34.0;

/// The stacked chart of data and log bytes from the first point to `now`,
/// with the free quota as a line.
pub fn chart(points: &[Point], now: DateTime<Utc>) -> String {
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg class="chart" viewBox="0 0 {W} {H}" role="img" aria-labelledby="chart-title" preserveAspectRatio="xMidYMid meet"><title id="chart-title">Storage used over time: data and log backups, and the free quota</title>"#
    );
    let Some(first) = points.first() else {
        let _ = write!(
            svg,
            r#"<text class="axis" x="{}" y="{}" text-anchor="middle">No usage samples yet</text></svg>"#,
            W / 2.0,
            H / 2.0
        );
        return svg;
    };
    // A margin before the first point, so its step is visible.
    let pad = ((now - first.at) / 20).max(chrono::Duration::seconds(2));
    let start = first.at - pad;
    let span = (now - start).num_milliseconds().max(1) as f64;
    let top = points
        .iter()
        .map(|p| (p.data + p.log).max(p.quota))
        .max()
        .unwrap_or(0)
        .max(1);
    let step = nice_step(top, 4);
    let y_max = top.div_ceil(step) * step;
    let x =
        |t: DateTime<Utc>| LEFT + (t - start).num_milliseconds() as f64 / span * (W - LEFT - RIGHT);
    let y = |v: u64| H - BOTTOM - v as f64 / y_max as f64 * (H - TOP - BOTTOM);

    // Grid and y labels.
    let mut v = 0;
    while v <= y_max {
        let _ = write!(
            svg,
            r#"<line class="grid" x1="{LEFT}" x2="{}" y1="{y:.1}" y2="{y:.1}"/><text class="axis" x="{}" y="{:.1}" text-anchor="end">{}</text>"#,
            W - RIGHT,
            LEFT - 8.0,
            y(v) + 4.0,
            bytes(v),
            y = y(v)
        );
        v += step;
    }
    // Time labels, rewritten into the browser's zone by the script.
    let span_t = now - start;
    let (fmt, kind) = if span_t < chrono::Duration::minutes(10) {
        ("%H:%M:%S UTC", "seconds")
    } else if span_t < chrono::Duration::days(2) {
        ("%H:%M UTC", "time")
    } else {
        ("%m-%d", "date")
    };
    for i in 0..=4 {
        let t = start + chrono::Duration::milliseconds((span * i as f64 / 4.0) as i64);
        let anchor = match i {
            0 => "start",
            4 => "end",
            _ => "middle",
        };
        let _ = write!(
            svg,
            r#"<text class="axis" x="{:.1}" y="{}" text-anchor="{anchor}" data-utc="{}" data-fmt="{kind}">{}</text>"#,
            x(t),
            H - 10.0,
            t.format("%Y-%m-%dT%H:%M:%SZ"),
            t.format(fmt)
        );
    }
    // Stacked step areas: data below, log above it.
    let last = points[points.len() - 1];
    let area = |lower: fn(&Point) -> u64, upper: fn(&Point) -> u64| {
        let mut d = format!("M{:.1},{:.1}", x(start), y(0));
        for p in points {
            let _ = write!(d, " H{:.1} V{:.1}", x(p.at), y(upper(p)));
        }
        let _ = write!(d, " H{:.1} V{:.1}", x(now), y(lower(&last)));
        for i in (0..points.len()).rev() {
            let below = if i == 0 { 0 } else { lower(&points[i - 1]) };
            let _ = write!(d, " H{:.1} V{:.1}", x(points[i].at), y(below));
        }
        let _ = write!(d, " H{:.1} Z", x(start));
        d
    };
    let data_area = area(|_| 0, |p| p.data);
    let log_area = area(|p| p.data, |p| p.data + p.log);
    let _ = write!(
        svg,
        r#"<path class="area data" d="{data_area}"/><path class="area log" d="{log_area}"/>"#
    );
    let mut quota = format!("M{:.1},{:.1}", x(first.at), y(first.quota));
    for p in &points[1..] {
        let _ = write!(quota, " H{:.1} V{:.1}", x(p.at), y(p.quota));
    }
    let _ = write!(quota, " H{:.1}", x(now));
    let _ = write!(svg, r#"<path class="quota" d="{quota}"/>"#);
    let _ = write!(
        svg,
        r#"<line class="axisline" x1="{LEFT}" x2="{}" y1="{y0}" y2="{y0}"/></svg>"#,
        W - RIGHT,
        y0 = y(0)
    );
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn the_tab_shows_the_cross_region_figure_or_that_it_is_unknown() {
        use std::sync::Arc;

        use strata_catalog::{Catalog, Instance, SqliteCatalog, SslMode};
        use strata_engine::{Engine, EngineSettings};
        use strata_repo::{LocalStorage, Repository};

        let dir = tempfile::tempdir().unwrap();
        let catalog: Arc<dyn Catalog> = Arc::new(SqliteCatalog::open_in_memory().unwrap());
        let storage = Arc::new(LocalStorage::new(dir.path().join("repo")).unwrap());
        let engine = Engine::new(
            catalog.clone(),
            Repository::open_or_init(storage).unwrap(),
            EngineSettings::default(),
        );
        catalog
            .add_instance(&Instance::new(
                "a",
                "127.0.0.1",
                5432,
                "postgres",
                SslMode::Prefer,
            ))
            .unwrap();
        let t0 = at("2026-11-25T10:00:00Z");
        let service = Service::new(
            engine,
            Arc::new(strata_service::ManualClock::new(
                t0 + chrono::Duration::hours(1),
            )),
            strata_service::ServiceSettings {
                instances_dir: dir.path().join("instances"),
                drills: false,
                ..Default::default()
            },
        );
        let sample = |minutes, cross| UsageSample {
            instance_id: "a".into(),
            at: t0 + chrono::Duration::minutes(minutes),
            logical_bytes: 8 << 20,
            data_bytes: 2 << 20,
            wal_bytes: 1 << 20,
            quota_bytes: 1 << 20,
            cross_region_bytes: cross,
        };
        let figure = |html: &str| {
            let start = html.find(r#"id="usage-cross-region">"#).expect(html) + 24;
            html[start..start + html[start..].find('<').unwrap()].to_string()
        };
        catalog.add_usage_sample(&sample(0, Some(5 << 20))).unwrap();
        let html = tab(&service, "a", t0).into_string();
        assert_eq!(figure(&html), "5.0 MiB");
        // Copies are outside the total and the excess.
        assert!(html.contains(r#"id="usage-total">3.0 MiB<"#), "{html}");
        assert!(html.contains(r#"data-bytes="2097152">2.0 MiB<"#), "{html}");
        catalog.add_usage_sample(&sample(10, None)).unwrap();
        assert_eq!(figure(&tab(&service, "a", t0).into_string()), "unknown");
    }

    #[test]
    fn steps_are_round_in_binary_units() {
        assert_eq!(nice_step(4, 4), 1);
        assert_eq!(nice_step(1000, 4), 500);
        assert_eq!(nice_step(90 << 20, 4), 50 << 20);
        assert_eq!(nice_step(30 << 20, 4), 10 << 20);
        assert_eq!(nice_step(3 << 30, 4), 1 << 30);
    }

    #[test]
    fn downsampling_keeps_the_ends_and_the_latest_of_each_slice() {
        let t0 = at("2026-11-25T00:00:00Z");
        let points: Vec<Point> = (0..1000)
            .map(|i| Point {
                at: t0 + chrono::Duration::seconds(i),
                data: i as u64,
                log: 0,
                quota: 0,
            })
            .collect();
        let d = downsample(&points, 100);
        assert!(d.len() <= 100, "{}", d.len());
        assert_eq!(d[0], points[0]);
        assert_eq!(d.last(), points.last());
        assert!(d.windows(2).all(|w| w[0].at < w[1].at));
        assert_eq!(downsample(&points[..10], 100), points[..10].to_vec());
    }

    #[test]
    fn chart_draws_both_series_and_labels() {
        let t0 = at("2026-11-25T10:00:00Z");
        let points = vec![
            Point {
                at: t0,
                data: 10 << 20,
                log: 0,
                quota: 20 << 20,
            },
            Point {
                at: t0 + chrono::Duration::minutes(30),
                data: 10 << 20,
                log: 16 << 20,
                quota: 40 << 20,
            },
        ];
        let svg = chart(&points, t0 + chrono::Duration::hours(1));
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"), "{svg}");
        assert!(svg.contains(r#"class="area data""#) && svg.contains(r#"class="area log""#));
        assert!(svg.contains(r#"<path class="quota" d="M"#), "{svg}");
        assert!(svg.contains("MiB"), "{svg}");
        // The axis starts a little before the first point (1/20 of the span).
        assert!(svg.contains(r#"data-utc="2026-11-25T09:57:00Z""#), "{svg}");
        assert!(!svg.contains("NaN"), "{svg}");
        let empty = chart(&[], t0);
        assert!(empty.contains("No usage samples yet"));
    }
}
