//! The console's stylesheet, script and icon, compiled into the binary and
//! served under `/console/static/` with a content hash in the URL, so
//! browsers may cache them for good and still see a new build at once.

use std::sync::LazyLock;

use axum::extract::Path;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

const CSS: &str = include_str!("../assets/console.css");
const JS: &str = include_str!("../assets/console.js");
const ICON: &str = include_str!("../assets/icon.svg");

/// FNV-1a over every asset: changes whenever one does.
static VERSION: LazyLock<String> = LazyLock::new(|| {
    let h = [CSS, JS, ICON]
        .iter()
        .flat_map(|s| s.bytes())
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        });
    format!("{h:016x}")
});

pub fn css_url() -> String {
    format!("/console/static/{}/console.css", *VERSION)
}

pub fn js_url() -> String {
    format!("/console/static/{}/console.js", *VERSION)
}

pub fn icon_url() -> String {
    format!("/console/static/{}/icon.svg", *VERSION)
}

/// `GET /console/static/{version}/{name}`.
pub async fn serve(Path((version, name)): Path<(String, String)>) -> Response {
    let (body, kind) = match name.as_str() {
        "console.css" => (CSS, "text/css; charset=utf-8"),
        "console.js" => (JS, "text/javascript; charset=utf-8"),
        "icon.svg" => (ICON, "image/svg+xml"),
        _ => return StatusCode::NOT_FOUND.into_response(),
    };
    // An old page may ask for an older version: it gets the current one, uncached.
    let cache = if version == *VERSION {
        "public, max-age=31536000, immutable"
    } else {
        "no-cache"
    };
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, cache),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}
