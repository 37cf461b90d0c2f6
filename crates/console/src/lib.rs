//! Strata's web console, served by `strata serve` under `/console/`: the
//! instance list, each instance's Backup and Restoration page (base backups
//! with their downloads, backup strategy, restore, cross-region backup,
//! storage), the Task Center, laid out as RDS
//! users know them, the fleet's nodes with their health, and the
//! notification sinks with their deliveries.
//!
//! Pages are rendered on the server; a small script (no build step, nothing
//! from the internet) adds local times, sorting, dialogs and the Task
//! Center's live progress, which polls `/console/api/tasks`.
//!
//! Every change goes through [`strata_api::invoke`], the code the RPC
//! endpoint runs, with the session's AccessKey as the principal: the console
//! validates, refuses and words errors exactly as the API does, and a
//! read-only key is refused there even if a page were to offer it a button.
//! Lists the API pages and filters (`DescribeBackups`,
//! `DescribeBinlogFiles`) are read through their actions for the same
//! reason; overviews the API has no action for (all jobs, storage history)
//! read the catalog.
#![warn(missing_docs)]

mod assets;
mod cross_region;
mod events;
mod instance;
mod instances;
mod layout;
mod nodes;
mod notifications;
mod session;
mod storage;
mod tasks;

use std::sync::Arc;

use axum::extract::{FromRequestParts, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use maud::{html, Markup};
use serde::Deserialize;
use serde_json::{Map, Value};
use strata_api::{ApiError, ApiResult, Params};
use strata_service::Service;

use session::{Flash, Sessions, Signed, LIFETIME, SESSION_COOKIE, SIGNIN_COOKIE};

/// Where browsers land.
pub const HOME: &str = "/console/";

/// What the console's pages share: the service they read, the API its
/// changes go through, and the signed-in sessions.
pub struct ConsoleState {
    service: Arc<Service>,
    /// The API the console's changes go through.
    api: Arc<strata_api::ApiState>,
    sessions: Sessions,
    /// Mark cookies `Secure` (the server speaks HTTPS).
    secure_cookies: bool,
}

impl ConsoleState {
    /// A console over `api`; `secure_cookies` when served over HTTPS.
    pub fn new(api: Arc<strata_api::ApiState>, secure_cookies: bool) -> Arc<Self> {
        Arc::new(ConsoleState {
            service: Arc::clone(&api.service),
            api,
            sessions: Sessions,
            secure_cookies,
        })
    }

    /// Runs an API action as the signed-in key.
    async fn call(
        &self,
        who: &Signed,
        action: &str,
        params: Vec<(&str, String)>,
    ) -> ApiResult<Map<String, Value>> {
        let params = params
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        strata_api::invoke(&self.api, &who.principal(), action, Params::new(params)).await
    }

    /// Records a one-time message for the next page of this session.
    fn flash(&self, who: &Signed, f: Flash) {
        self.sessions.set_flash(&who.id, f, self.service.catalog());
    }

    fn flash_error(&self, who: &Signed, lead: &str, e: &ApiError) {
        self.flash(
            who,
            Flash::Failed {
                text: format!("{lead} {}", e.message),
                code: e.code.clone(),
            },
        );
    }
}

/// The console's routes, all under `/console`.
pub fn router(state: Arc<ConsoleState>) -> Router {
    Router::new()
        .route("/console", get(|| async { Redirect::permanent(HOME) }))
        .route(HOME, get(instances::page))
        .route("/console/signin", get(signin_page).post(signin))
        .route("/console/signout", post(signout))
        .route("/console/tasks", get(tasks::page))
        .route("/console/nodes", get(nodes::page))
        .route("/console/notifications", get(notifications::page))
        .route(
            "/console/notifications/test",
            post(notifications::send_test),
        )
        .route("/console/api/tasks", get(tasks::json))
        .route(
            "/console/instances/{id}",
            get(
                |axum::extract::Path(id): axum::extract::Path<String>| async move {
                    Redirect::to(&format!("/console/instances/{}/backups", url_encode(&id)))
                },
            ),
        )
        .route("/console/instances/{id}/backups", get(instance::backups))
        .route(
            "/console/instances/{id}/strategy",
            get(instance::strategy).post(instance::save_strategy),
        )
        .route(
            "/console/instances/{id}/strategy/rules",
            post(instance::save_rule),
        )
        .route("/console/instances/{id}/restore", get(instance::restore))
        .route(
            "/console/instances/{id}/restore/clone",
            post(instance::clone_instance),
        )
        .route(
            "/console/instances/{id}/restore/databases",
            get(instance::set_databases).post(instance::restore_databases),
        )
        .route(
            "/console/instances/{id}/restore/tables",
            post(instance::restore_tables),
        )
        .route(
            "/console/instances/{id}/restore/event",
            post(instance::restore_event),
        )
        .route(
            "/console/instances/{id}/cross-region",
            get(cross_region::page).post(cross_region::save),
        )
        .route("/console/instances/{id}/storage", get(instance::storage))
        .route("/console/instances/{id}/backup", post(instance::backup_now))
        .route(
            "/console/instances/{id}/backups/keep",
            post(instance::keep_backup),
        )
        .route("/console/static/{version}/{name}", get(assets::serve))
        .route("/console/{*rest}", get(not_found))
        .layer(middleware::map_response(security_headers))
        .with_state(state)
}

/// The console beside `api`, with browsers that open `/` sent to the
/// console. Only a plain browser visit is redirected (a GET of `/` without a
/// query, action header or signature that accepts HTML): every RPC request,
/// signed or not, reaches the API as before.
pub fn with_console(api: Router, state: Arc<ConsoleState>) -> Router {
    router(state).merge(api.layer(middleware::from_fn(redirect_browsers)))
}

async fn redirect_browsers(req: Request, next: Next) -> Response {
    if is_browser_visit(req.method(), req.uri(), req.headers()) {
        return Redirect::to(HOME).into_response();
    }
    next.run(req).await
}

fn is_browser_visit(method: &Method, uri: &axum::http::Uri, headers: &HeaderMap) -> bool {
    let accepts_html = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("text/html"));
    method == Method::GET
        && uri.path() == "/"
        && uri.query().is_none_or(str::is_empty)
        && !headers.contains_key("x-acs-action")
        && !headers.contains_key(header::AUTHORIZATION)
        && accepts_html
}

async fn security_headers(mut res: Response) -> Response {
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
             connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    res
}

fn html_response(status: StatusCode, markup: Markup) -> Response {
    (status, Html(markup.into_string())).into_response()
}

/// Percent-encodes a path segment or query value.
pub(crate) fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A signed-in page request: who, and the one-time message for this page.
pub(crate) struct Page {
    who: Signed,
    flash: Option<Flash>,
}

impl FromRequestParts<Arc<ConsoleState>> for Page {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<ConsoleState>,
    ) -> Result<Self, Self::Rejection> {
        let headers = &parts.headers;
        let signed =
            strata_api::off_the_workers(|| state.sessions.get(headers, state.service.catalog()));
        let Some(who) = signed else {
            let back = parts
                .uri
                .path_and_query()
                .map(|p| p.as_str())
                .unwrap_or(HOME);
            let to = if parts.method == Method::GET {
                format!("/console/signin?next={}", url_encode(back))
            } else {
                "/console/signin".to_string()
            };
            return Err(Redirect::to(&to).into_response());
        };
        let flash = if parts.method == Method::GET {
            strata_api::off_the_workers(|| {
                state.sessions.take_flash(&who.id, state.service.catalog())
            })
        } else {
            None
        };
        Ok(Page { who, flash })
    }
}

/// A submitted form as name/value pairs (names may repeat).
pub(crate) struct Fields(Vec<(String, String)>);

impl Fields {
    fn get(&self, name: &str) -> &str {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .unwrap_or("")
    }

    fn all(&self, name: &str) -> Vec<&str> {
        self.0
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// Whether a state-changing request carries the session's CSRF token.
fn csrf_ok(who: &Signed, form: &Fields) -> bool {
    who.csrf_matches(form.get("csrf"))
}

/// The answer to a state-changing request without the session's CSRF token.
fn csrf_refused(who: &Signed) -> Response {
    html_response(
        StatusCode::FORBIDDEN,
        layout::page(
            "Request refused",
            Some(who),
            layout::Section::None,
            None,
            html! {
                h1 { "Request refused" }
                p { "The form was not sent from this console session (its security token did not match). "
                    "Go back, reload the page and try again." }
            },
        ),
    )
}

async fn not_found(page: Result<Page, Response>) -> Response {
    let body = html! {
        h1 { "Not found" }
        p { "There is no such page. " a href=(HOME) { "Back to the instances" } }
    };
    let who = page.ok().map(|p| p.who);
    html_response(
        StatusCode::NOT_FOUND,
        layout::page("Not found", who.as_ref(), layout::Section::None, None, body),
    )
}

// ----- sign-in -----

#[derive(Deserialize)]
struct NextQuery {
    next: Option<String>,
}

/// Only console paths are followed after sign-in (no open redirect).
fn safe_next(next: Option<&str>) -> String {
    match next {
        Some(n) if n.starts_with(HOME) && !n.contains("//") && !n.contains('\\') => n.to_string(),
        _ => HOME.to_string(),
    }
}

fn signin_form(next: &str, token: &str, error: Option<&str>, key_id: &str) -> Markup {
    let body = html! {
        div.signin {
            h1 { "Sign in to Strata" }
            p.muted { "Use an AccessKey pair of this Strata server." }
            @if let Some(e) = error {
                div.notice.err role="alert" { (e) }
            }
            form method="post" action="/console/signin" {
                input type="hidden" name="csrf" value=(token);
                input type="hidden" name="next" value=(next);
                label for="key-id" { "AccessKey ID" }
                input #key-id name="access_key_id" value=(key_id) required autocomplete="username"
                    autofocus[key_id.is_empty()] spellcheck="false";
                label for="key-secret" { "AccessKey Secret" }
                input #key-secret name="access_key_secret" type="password" required
                    autocomplete="current-password" autofocus[!key_id.is_empty()];
                button.primary type="submit" { "Sign in" }
            }
            p.hint {
                "The admin key is in " code { "<data_dir>/admin-key.json" }
                "; make more with " code { "strata key create" } " ("
                code { "--read-only" } " for keys that may only look)."
            }
        }
    };
    layout::page("Sign in", None, layout::Section::None, None, body)
}

fn with_signin_cookie(
    state: &ConsoleState,
    status: StatusCode,
    markup: Markup,
    token: &str,
) -> Response {
    let mut res = html_response(status, markup);
    let cookie = session::set_cookie(
        SIGNIN_COOKIE,
        token,
        std::time::Duration::from_secs(3600),
        state.secure_cookies,
    );
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        res.headers_mut().append(header::SET_COOKIE, v);
    }
    res
}

async fn signin_page(
    State(state): State<Arc<ConsoleState>>,
    headers: HeaderMap,
    Query(q): Query<NextQuery>,
) -> Response {
    let next = safe_next(q.next.as_deref());
    if state
        .sessions
        .get(&headers, state.service.catalog())
        .is_some()
    {
        return Redirect::to(&next).into_response();
    }
    let token = session::random_token();
    with_signin_cookie(
        &state,
        StatusCode::OK,
        signin_form(&next, &token, None, ""),
        &token,
    )
}

async fn signin(
    State(state): State<Arc<ConsoleState>>,
    headers: HeaderMap,
    Form(form): Form<Vec<(String, String)>>,
) -> Response {
    let form = Fields(form);
    let next = safe_next(Some(form.get("next")));
    let token_ok = session::cookie(&headers, SIGNIN_COOKIE)
        .is_some_and(|c| session::same(c, form.get("csrf")));
    let fail = |message: &str| {
        let token = session::random_token();
        with_signin_cookie(
            &state,
            StatusCode::UNAUTHORIZED,
            signin_form(&next, &token, Some(message), form.get("access_key_id")),
            &token,
        )
    };
    if !token_ok {
        return fail("The sign-in form had expired. Please sign in again.");
    }
    let catalog = state.service.catalog();
    let Some(principal) = session::check_key_pair(
        catalog,
        form.get("access_key_id"),
        form.get("access_key_secret"),
    ) else {
        tracing::info!(
            "console sign-in refused for key {}",
            strata_api::quoted(form.get("access_key_id"))
        );
        return fail("That AccessKey ID and secret do not match a key of this server.");
    };
    let id = match state.sessions.create(&principal, state.service.catalog()) {
        Ok(id) => id,
        Err(e) => {
            tracing::warn!("console sign-in: {e}");
            return fail("The catalog cannot be reached just now; try again in a moment.");
        }
    };
    tracing::info!(key = %principal.access_key_id, "console sign-in");
    let mut res = Redirect::to(&next).into_response();
    for c in [
        session::set_cookie(SESSION_COOKIE, &id, LIFETIME, state.secure_cookies),
        session::set_cookie(
            SIGNIN_COOKIE,
            "",
            std::time::Duration::ZERO,
            state.secure_cookies,
        ),
    ] {
        if let Ok(v) = HeaderValue::from_str(&c) {
            res.headers_mut().append(header::SET_COOKIE, v);
        }
    }
    res
}

async fn signout(
    State(state): State<Arc<ConsoleState>>,
    page: Page,
    Form(form): Form<Vec<(String, String)>>,
) -> Response {
    if !csrf_ok(&page.who, &Fields(form)) {
        return csrf_refused(&page.who);
    }
    state.sessions.remove(&page.who.id, state.service.catalog());
    let mut res = Redirect::to("/console/signin").into_response();
    let c = session::set_cookie(
        SESSION_COOKIE,
        "",
        std::time::Duration::ZERO,
        state.secure_cookies,
    );
    if let Ok(v) = HeaderValue::from_str(&c) {
        res.headers_mut().append(header::SET_COOKIE, v);
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn only_plain_browser_visits_of_the_root_are_redirected() {
        let html = [("accept", "text/html,application/xhtml+xml,*/*;q=0.8")];
        let get = Method::GET;
        assert!(is_browser_visit(
            &get,
            &"/".parse().unwrap(),
            &headers(&html)
        ));
        // RPC calls: a query, an action header, a signature, a POST, no HTML.
        assert!(!is_browser_visit(
            &get,
            &"/?Action=DescribeDBInstances".parse().unwrap(),
            &headers(&html)
        ));
        assert!(!is_browser_visit(
            &get,
            &"/".parse().unwrap(),
            &headers(&[html[0], ("x-acs-action", "DescribeDBInstances")])
        ));
        assert!(!is_browser_visit(
            &get,
            &"/".parse().unwrap(),
            &headers(&[html[0], ("authorization", "ACS3-HMAC-SHA256 x")])
        ));
        assert!(!is_browser_visit(
            &Method::POST,
            &"/".parse().unwrap(),
            &headers(&html)
        ));
        assert!(!is_browser_visit(
            &get,
            &"/".parse().unwrap(),
            &headers(&[("accept", "application/json")])
        ));
        assert!(!is_browser_visit(
            &get,
            &"/metrics".parse().unwrap(),
            &headers(&html)
        ));
    }

    #[test]
    fn sign_in_follows_only_console_paths() {
        assert_eq!(
            safe_next(Some("/console/tasks?status=failed")),
            "/console/tasks?status=failed"
        );
        assert_eq!(safe_next(Some("https://evil.example/")), HOME);
        assert_eq!(safe_next(Some("/console//evil.example")), HOME);
        assert_eq!(safe_next(Some("/metrics")), HOME);
        assert_eq!(safe_next(None), HOME);
    }

    #[test]
    fn url_encoding() {
        assert_eq!(url_encode("pg-1.a_b~"), "pg-1.a_b~");
        assert_eq!(url_encode("/console/x?a=1&b"), "%2Fconsole%2Fx%3Fa%3D1%26b");
    }
}
