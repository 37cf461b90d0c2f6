//! Strata's HTTP front. `POST /` (and `GET /`) is the RDS 2014-08-15 RPC
//! endpoint: parameters in the query string or a form body, the action from
//! `Action` or `x-acs-action`, every request signed with an AccessKey, JSON
//! answers with a `RequestId`. `/metrics` serves Prometheus figures and
//! `/healthz` answers when the server is up.
//!
//! Actions are dispatched in [`actions`]; extension actions (what RDS has
//! no call for) are prefixed `Strata`.

mod actions;
mod auth;
mod cross_region;
mod download;
mod error;
mod params;

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
use tokio::net::TcpListener;
use tokio::sync::watch;

pub use actions::{exists as action_exists, listed_wal_segments, receiver_status};
pub use auth::Principal;
pub use download::LinkSigner;
pub use error::{ApiError, ApiResult};
pub use params::Params;
/// What the console says about how a registered server is reached.
pub use strata_engine::{connection_verified, connection_warnings};

/// The API version Strata speaks.
pub const API_VERSION: &str = "2014-08-15";

pub struct ApiState {
    pub service: Arc<Service>,
    /// Signs and checks download links.
    pub links: LinkSigner,
    /// Reported as `HostId` in errors.
    pub host_id: String,
}

pub fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/", get(rpc).post(rpc))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/download/backups/{instance}/{file}", get(download::backup))
        .route("/download/wal/{instance}/{file}", get(download::wal))
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
    let outcome = handle(&state, &parts, &headers).await;
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
    headers: &HeaderMap,
) -> ApiResult<(String, Map<String, Value>)> {
    let params = params::Params::new(acs_signature::request_params(parts)?);
    let header = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let action = params
        .get("Action")
        .map(str::to_string)
        .or_else(|| header("x-acs-action"))
        .ok_or_else(|| ApiError::missing("Action"))?;
    let version = params
        .get("Version")
        .map(str::to_string)
        .or_else(|| header("x-acs-version"))
        .ok_or_else(|| ApiError::missing("Version"))?;
    if version != API_VERSION {
        return Err(ApiError::bad(
            "InvalidVersion",
            format!("Specified parameter Version {version:?} is not valid: Strata speaks {API_VERSION}."),
        ));
    }
    let principal = auth::authenticate(state.service.engine.catalog.as_ref(), parts)?;
    let fields = invoke(state, &principal, &action, params).await?;
    Ok((action, fields))
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
                "Specified api {action} is not found. Supported actions: {}.",
                actions::ACTIONS.join(", ")
            ),
        ));
    }
    if principal.read_only
        && !action.starts_with("Describe")
        && !action.starts_with("StrataDescribe")
    {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "Forbidden.ReadOnlyAccessKey",
            format!(
                "AccessKey {} is read-only: it may call only Describe* actions, not {action}.",
                principal.access_key_id
            ),
        ));
    }
    actions::dispatch(state, action, &params).await
}

async fn metrics(State(state): State<Arc<ApiState>>) -> Response {
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
    pub cert: std::path::PathBuf,
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
