//! Strata's HTTP front. `POST /` (and `GET /`) is the RDS 2014-08-15 RPC
//! endpoint: parameters in the query string or a form body, the action from
//! `Action` or (V3 only, where it is signed) `x-acs-action`, every request
//! signed with an AccessKey and run only as signed, JSON
//! answers with a `RequestId`. `/metrics` serves Prometheus figures and
//! `/healthz` answers when the server is up.
//!
//! Actions are dispatched in `actions`; extension actions (what RDS has
//! no call for) are prefixed `Strata`.
#![warn(missing_docs)]

mod actions;
mod advanced;
mod auth;
mod cross_region;
mod download;
mod encryption;
mod error;
mod log_files;
mod meta;
mod params;
mod user_backups;

use std::net::SocketAddr;
use std::sync::Arc;

use acs_signature::RequestParts;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde_json::{json, Map, Value};
use strata_service::Service;
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio::sync::watch;

pub use actions::{exists as action_exists, instance_state, receiver_status, InstanceState};
pub use auth::Principal;
pub use download::LinkSigner;
pub use error::{quoted, shown, ApiError, ApiResult};
pub use log_files::listed_wal_segments;
pub use params::Params;
/// What the console says about how a registered server is reached.
pub use strata_engine::{connection_verified, connection_warnings, EVENT_KINDS};

/// The API version Strata speaks.
pub const API_VERSION: &str = "2014-08-15";

/// What every request handler shares.
pub struct ApiState {
    /// The service the actions call.
    pub service: Arc<Service>,
    /// Signs and checks download links.
    pub links: LinkSigner,
    /// Reported as `HostId` in errors.
    pub host_id: String,
    /// Where `/metrics` is served and who may read it.
    pub metrics: MetricsAccess,
}

/// Who may scrape `/metrics`, and on which listener. The default is open on
/// the API's listener: the figures name instance ids, so an operator who
/// does not want every API client to see them sets a token or moves the
/// endpoint to an address only the scraper reaches, or both.
#[derive(Clone, Default)]
pub struct MetricsAccess {
    /// A scrape must send `Authorization: Bearer <token>`; `None`: open.
    pub token: Option<String>,
    /// `/metrics` is served by [`metrics_router`] on a listener of its own,
    /// and [`router`] (the API's listener) does not serve it.
    pub own_listener: bool,
}

impl MetricsAccess {
    /// Whether `headers` carry the token (or none is needed). The comparison
    /// takes the same time wherever the first wrong byte is.
    fn admits(&self, headers: &HeaderMap) -> bool {
        let Some(token) = &self.token else {
            return true;
        };
        headers
            .get_all(axum::http::header::AUTHORIZATION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .filter_map(|v| {
                let (scheme, credentials) = v.trim().split_once(' ')?;
                scheme
                    .eq_ignore_ascii_case("Bearer")
                    .then_some(credentials.trim())
            })
            .any(|presented| bool::from(presented.as_bytes().ct_eq(token.as_bytes())))
    }
}

/// The API: the RPC endpoint, download links, `/healthz`, and `/metrics`
/// unless it has a listener of its own.
pub fn router(state: Arc<ApiState>) -> Router {
    let mut router = Router::new()
        .route("/", get(rpc).post(rpc))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/download/backups/{instance}/{file}", get(download::backup))
        .route("/download/wal/{instance}/{file}", get(download::wal));
    if !state.metrics.own_listener {
        router = router.route("/metrics", get(metrics));
    }
    router.with_state(state)
}

/// `/metrics` alone, for a listener of its own (`MetricsAccess::own_listener`).
pub fn metrics_router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .with_state(state)
}

fn request_id() -> String {
    let b: [u8; 16] = rand::random();
    let h = hex::encode_upper(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// Whether the current runtime can hand a worker's tasks to the others
/// (`block_in_place`); a single-threaded runtime cannot.
fn on_multi_thread_runtime() -> bool {
    matches!(
        tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()),
        Ok(tokio::runtime::RuntimeFlavor::MultiThread)
    )
}

/// Runs `f`, which blocks on synchronous catalog or storage calls, without
/// blocking an async worker: on a multi-thread runtime the current worker
/// hands its other tasks to the rest of the pool first
/// (`block_in_place`); elsewhere it simply runs.
pub fn off_the_workers<T>(f: impl FnOnce() -> T) -> T {
    if on_multi_thread_runtime() {
        tokio::task::block_in_place(f)
    } else {
        f()
    }
}

fn respond(status: StatusCode, body: Value) -> Response {
    (
        status,
        [(
            axum::http::header::CONTENT_TYPE,
            "application/json;charset=utf-8",
        )],
        body.to_string(),
    )
        .into_response()
}

async fn rpc(
    State(state): State<Arc<ApiState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let rid = request_id();
    let header_pairs: Vec<(String, String)> = headers
        .iter()
        .filter_map(|(k, v)| Some((k.as_str().to_string(), v.to_str().ok()?.to_string())))
        .collect();
    let parts = RequestParts {
        method: method.as_str(),
        path: uri.path(),
        raw_query: uri.query().unwrap_or(""),
        headers: &header_pairs,
        body: &body,
    };
    // An action reads and writes the catalog synchronously (a network
    // round trip on a PostgreSQL catalog): the request runs on this worker
    // after its other tasks were handed to the rest of the pool, so no
    // async worker is ever blocked on the catalog.
    let outcome = if on_multi_thread_runtime() {
        tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(handle(&state, &parts))
        })
    } else {
        handle(&state, &parts).await
    };
    match outcome {
        Ok((action, mut fields)) => {
            fields.insert("RequestId".into(), Value::String(rid.clone()));
            tracing::debug!(%action, request = %rid, "ok");
            respond(StatusCode::OK, Value::Object(fields))
        }
        Err(e) => {
            tracing::info!(request = %rid, code = %e.code, "refused: {}", e.message);
            respond(
                e.status,
                json!({"RequestId": rid, "HostId": state.host_id, "Code": e.code, "Message": e.message}),
            )
        }
    }
}

async fn handle(
    state: &Arc<ApiState>,
    parts: &RequestParts<'_>,
) -> ApiResult<(String, Map<String, Value>)> {
    // Before the signature: repeated parameter names, and the answers RDS gives any
    // client (signed or not) that names no action or another API version. Nothing
    // read here is used once the signature is checked.
    let unsigned = acs_signature::request_params(parts)?;
    let named = |param: &str, header: &str| {
        fn non_empty(v: &str) -> Option<&str> {
            Some(v.trim()).filter(|v| !v.is_empty())
        }
        unsigned
            .iter()
            .find(|(k, _)| k == param)
            .and_then(|(_, v)| non_empty(v))
            .or_else(|| {
                parts
                    .headers
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case(header))
                    .and_then(|(_, v)| non_empty(v))
            })
            .map(str::to_owned)
    };
    named("Action", "x-acs-action").ok_or_else(|| ApiError::missing("Action"))?;
    check_version(named("Version", "x-acs-version").as_deref())?;
    let (principal, call) = auth::authenticate(state.service.catalog(), parts)?;
    // From here on, only what the signature covers.
    let action = call.action.ok_or_else(|| ApiError::missing("Action"))?;
    check_version(call.version.as_deref())?;
    let fields = invoke(state, &principal, &action, params::Params::new(call.params)).await?;
    Ok((action, fields))
}

fn check_version(version: Option<&str>) -> ApiResult<()> {
    match version {
        Some(API_VERSION) => Ok(()),
        Some(other) => Err(ApiError::bad(
            "InvalidVersion",
            format!(
                "Specified parameter Version {} is not valid: Strata speaks {API_VERSION}.",
                error::shown(other)
            ),
        )),
        None => Err(ApiError::missing("Version")),
    }
}

/// Runs `action` for an authenticated `principal`: the permission check and
/// dispatch behind the RPC endpoint. The console calls actions through this
/// too, so its validation, error codes and messages and its read-only
/// refusals are the API's own.
pub async fn invoke(
    state: &ApiState,
    principal: &Principal,
    action: &str,
    params: params::Params,
) -> ApiResult<Map<String, Value>> {
    if !actions::exists(action) {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "InvalidAction.NotFound",
            format!(
                "Specified api {} is not found. Supported actions: {}.",
                error::shown(action),
                actions::ACTIONS.join(", ")
            ),
        ));
    }
    // Describe*, List* and Check* only read; a read-only key may call them.
    let reads = ["Describe", "StrataDescribe", "Check", "List"]
        .iter()
        .any(|prefix| action.starts_with(prefix));
    if principal.read_only && !reads {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "Forbidden.ReadOnlyAccessKey",
            format!(
                "AccessKey {} is read-only: it may call only Describe*, List* and Check* actions, not {action}.",
                principal.access_key_id
            ),
        ));
    }
    actions::dispatch(state, action, &params).await
}

async fn metrics(State(state): State<Arc<ApiState>>, headers: HeaderMap) -> Response {
    if !state.metrics.admits(&headers) {
        return (
            StatusCode::UNAUTHORIZED,
            [(
                axum::http::header::WWW_AUTHENTICATE,
                "Bearer realm=\"strata metrics\"",
            )],
            "/metrics needs Authorization: Bearer <metrics token>\n",
        )
            .into_response();
    }
    let svc = state.service.clone();
    match tokio::task::spawn_blocking(move || svc.metrics()).await {
        Ok(Ok(text)) => (
            StatusCode::OK,
            [(
                axum::http::header::CONTENT_TYPE,
                "text/plain; version=0.0.4",
            )],
            text,
        )
            .into_response(),
        Ok(Err(e)) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// Certificate chain and private key (PEM files) for HTTPS.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The certificate chain (PEM).
    pub cert: std::path::PathBuf,
    /// Its private key (PEM).
    pub key: std::path::PathBuf,
}

fn tls_acceptor(files: &TlsFiles) -> std::io::Result<tokio_rustls::TlsAcceptor> {
    let read = |p: &std::path::Path| {
        std::fs::read(p).map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", p.display())))
    };
    let certs =
        rustls_pemfile::certs(&mut &read(&files.cert)?[..]).collect::<Result<Vec<_>, _>>()?;
    if certs.is_empty() {
        return Err(std::io::Error::other(format!(
            "{}: no PEM certificate found",
            files.cert.display()
        )));
    }
    let key = rustls_pemfile::private_key(&mut &read(&files.key)?[..])?.ok_or_else(|| {
        std::io::Error::other(format!("{}: no PEM private key found", files.key.display()))
    })?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(std::io::Error::other)?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| std::io::Error::other(format!("TLS certificate/key: {e}")))?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Serves `router` on `listener` (HTTPS when `tls` is set) until `shutdown`
/// turns true.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    tls: Option<TlsFiles>,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let Some(files) = tls else {
        return axum::serve(listener, router)
            .with_graceful_shutdown(async move {
                let _ = shutdown.wait_for(|s| *s).await;
            })
            .await;
    };
    let acceptor = tls_acceptor(&files)?;
    loop {
        let (stream, peer): (tokio::net::TcpStream, SocketAddr) = tokio::select! {
            r = listener.accept() => r?,
            _ = shutdown.wait_for(|s| *s) => return Ok(()),
        };
        let acceptor = acceptor.clone();
        let svc = hyper_util::service::TowerToHyperService::new(router.clone());
        tokio::spawn(async move {
            let tls = match acceptor.accept(stream).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(%peer, "TLS handshake failed: {e}");
                    return;
                }
            };
            let io = hyper_util::rt::TokioIo::new(tls);
            if let Err(e) =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(io, svc)
                    .await
            {
                tracing::debug!(%peer, "connection: {e}");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::header::AUTHORIZATION;

    fn with_auth(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(AUTHORIZATION, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn metrics_token_is_a_bearer_token() {
        let open = MetricsAccess::default();
        assert!(open.admits(&HeaderMap::new()));
        let locked = MetricsAccess {
            token: Some("s3cr3t-token".into()),
            own_listener: false,
        };
        assert!(locked.admits(&with_auth(&["Bearer s3cr3t-token"])));
        assert!(locked.admits(&with_auth(&["bearer  s3cr3t-token "])));
        assert!(locked.admits(&with_auth(&["Basic eA==", "Bearer s3cr3t-token"])));
        for refused in [
            &[][..],
            &["Bearer s3cr3t-toke"],
            &["Bearer s3cr3t-token2"],
            &["Bearer"],
            &["Bearer "],
            &["s3cr3t-token"],
            &["Basic s3cr3t-token"],
            &["Bearer S3CR3T-TOKEN"],
        ] {
            assert!(!locked.admits(&with_auth(refused)), "{refused:?}");
        }
    }
}
