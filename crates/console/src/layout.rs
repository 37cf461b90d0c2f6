//! The page chrome every console page shares (top bar, navigation, one-time
//! messages) and the small renderers pages use for times, sizes, states and
//! API errors. Markup is built with `maud`, which escapes every value.

use chrono::{DateTime, Utc};
use maud::{html, Markup, PreEscaped, DOCTYPE};
use strata_api::ApiError;

use crate::assets;
use crate::session::{Flash, Signed};

/// Which top-level section a page belongs to.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Section {
    Instances,
    Tasks,
    Nodes,
    Notifications,
    None,
}

/// A whole page: `who` is absent on the sign-in page.
pub fn page(
    title: &str,
    who: Option<&Signed>,
    section: Section,
    flash: Option<Flash>,
    body: Markup,
) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · Strata" }
                link rel="stylesheet" href=(assets::css_url());
                link rel="icon" href=(assets::icon_url()) type="image/svg+xml";
                script src=(assets::js_url()) defer {}
            }
            body {
                header.topbar {
                    a.brand href="/console/" {
                        img src=(assets::icon_url()) alt="" width="22" height="22";
                        span { "Strata" }
                    }
                    @if let Some(who) = who {
                        nav.mainnav aria-label="Main" {
                            a href="/console/" aria-current=[(section == Section::Instances).then_some("page")] { "Instances" }
                            a href="/console/tasks" aria-current=[(section == Section::Tasks).then_some("page")] { "Task Center" }
                            a href="/console/nodes" aria-current=[(section == Section::Nodes).then_some("page")] { "Nodes" }
                            a href="/console/notifications" aria-current=[(section == Section::Notifications).then_some("page")] { "Notifications" }
                        }
                        div.whoami {
                            span.key title="Signed in with this AccessKey" { (who.key_id) }
                            @if who.read_only {
                                span.badge.neutral title="This key may only look: it cannot start backups or change policies" { "read-only" }
                            }
                            form method="post" action="/console/signout" {
                                input type="hidden" name="csrf" value=(who.csrf);
                                button.link type="submit" { "Sign out" }
                            }
                        }
                    }
                }
                main {
                    @if let Some(f) = flash {
                        (flash_box(&f))
                    }
                    (body)
                }
            }
        }
    }
}

fn flash_box(f: &Flash) -> Markup {
    match f {
        Flash::Done { text, link } => html! {
            div.notice.ok role="status" {
                (text)
                @if let Some((href, label)) = link { " " a href=(href) { (label) } }
            }
        },
        Flash::Failed { text, code } => html! {
            div.notice.err role="alert" { (text) " " span.code { (code) } }
        },
    }
}

/// An API error in plain words: the API's message, its code small beside it.
pub fn error_box(lead: &str, e: &ApiError) -> Markup {
    html! {
        div.notice.err role="alert" {
            strong { (lead) } " " (e.message) " " span.code { (e.code) }
        }
    }
}

/// A moment: shown in UTC by the server, rewritten by the script into the
/// browser's zone with the UTC time kept in the tooltip.
pub fn time(t: DateTime<Utc>) -> Markup {
    let utc = t.format("%Y-%m-%d %H:%M:%S UTC").to_string();
    html! {
        time datetime=(t.format("%Y-%m-%dT%H:%M:%SZ").to_string()) title=(utc) { (utc) }
    }
}

/// Sort key for a table cell holding a time (milliseconds since the epoch).
pub fn sort_time(t: Option<DateTime<Utc>>) -> String {
    t.map(|t| t.timestamp_millis().to_string())
        .unwrap_or_default()
}

/// An RDS-format time from an API answer (`yyyy-MM-ddTHH:mm:ssZ`).
pub fn parse_api_time(s: &str) -> Option<DateTime<Utc>> {
    chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%SZ")
        .or_else(|_| chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%MZ"))
        .ok()
        .map(|t| t.and_utc())
}

/// An API time as a `time` element, or a dash when empty.
pub fn api_time(s: &str) -> Markup {
    match parse_api_time(s) {
        Some(t) => time(t),
        None => html! { span.muted { "—" } },
    }
}

/// Bytes in binary units, e.g. `12.3 MiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    // 1023.99 KiB would read "1024 KiB": promote it too.
    while v >= 1023.5 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else if v >= 100.0 {
        format!("{v:.0} {}", UNITS[u])
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// `150004` → `15.4`; `90624` → `9.6.24`.
pub fn pg_version(num: Option<u32>) -> String {
    match num {
        Some(n) if n >= 100_000 => format!("{}.{}", n / 10000, n % 10000),
        Some(n) => format!("{}.{}.{}", n / 10000, n / 100 % 100, n % 100),
        None => "unknown".into(),
    }
}

/// A coloured word for a state.
pub fn badge(kind: &str, text: &str) -> Markup {
    html! { span class=(format!("badge {kind}")) { (text) } }
}

/// The colour a backup set status or job state is shown in.
pub fn state_kind(state: &str) -> &'static str {
    match state {
        "Success" | "Finished" | "Completed" | "Streaming" => "ok",
        "Failed" | "Unreachable" => "err",
        "NoStart" | "Off" => "neutral",
        s if s.starts_with("Failing") => "err",
        _ => "info",
    }
}

/// A column header that the script can sort by.
pub fn sort_th(label: &str, kind: &str) -> Markup {
    html! {
        th data-sort=(kind) scope="col" {
            button.sort type="button" { (label) }
        }
    }
}

/// The hidden CSRF field every form carries.
pub fn csrf(who: &Signed) -> Markup {
    html! { input type="hidden" name="csrf" value=(who.csrf); }
}

/// An inline SVG is trusted markup built by [`crate::storage`].
pub fn svg(markup: String) -> Markup {
    PreEscaped(markup)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_versions_read_well() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(300 * 1024 * 1024), "300 MiB");
        assert_eq!(bytes(1024 * 1024 - 5), "1.0 MiB");
        assert_eq!(pg_version(Some(150004)), "15.4");
        assert_eq!(pg_version(Some(180000)), "18.0");
        assert_eq!(pg_version(Some(90624)), "9.6.24");
        assert_eq!(pg_version(None), "unknown");
    }

    #[test]
    fn times_carry_utc_for_the_script() {
        let t = parse_api_time("2026-11-25T10:00:07Z").unwrap();
        let m = time(t).into_string();
        assert!(m.contains(r#"datetime="2026-11-25T10:00:07Z""#), "{m}");
        assert!(m.contains("2026-11-25 10:00:07 UTC"), "{m}");
        assert_eq!(
            parse_api_time("2026-11-25T10:00Z").unwrap().to_rfc3339(),
            "2026-11-25T10:00:00+00:00"
        );
        assert!(parse_api_time("").is_none());
    }

    #[test]
    fn values_are_escaped() {
        let m = badge("ok", "<script>").into_string();
        assert!(m.contains("&lt;script&gt;"), "{m}");
    }
}
