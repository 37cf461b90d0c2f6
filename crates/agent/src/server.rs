//! The agent's HTTP server: checks every request's signature, then serves snapshots and
//! clones of its one data directory (see `proto` for the paths).
//!
//! The agent refuses to start on a file system that cannot clone files, with one line naming
//! the file system and what is needed. Disk work runs on the blocking pool; file reads are
//! streamed in 256 KiB chunks, so a large range never sits in memory.

use std::io::{self, SeekFrom};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path as UrlPath, Query, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::auth::{unix_now, AgentKey, Verifier};
use crate::clone_server::{CloneServers, StartRequest};
use crate::cow;
use crate::names::{CloneName, RelPath, SnapshotName};
use crate::proto::{
    ChangesQuery, CloneRequest, ErrorBody, ErrorCode, FileQuery, HostFacts, SpaceEstimate,
    MAX_READ_LEN, MAX_REQUEST_BODY,
};
use crate::snapshot::{FreeFloor, Labels, Layout, SnapshotError, SnapshotStore};
use crate::wal::{is_wal_upload, WalFileName, WalRangeRequest, WalTarget};

/// Why the agent cannot start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The data directory's file system cannot clone files.
    #[error("data directory {} is on {fs_type}, which cannot clone files; snapshots need a file system with reflink (XFS made with -m reflink=1, or btrfs)", data_dir.display())]
    NotCopyOnWrite {
        /// The data directory.
        data_dir: PathBuf,
        /// Its file system.
        fs_type: String,
    },
    /// The snapshot directory is on another file system than the data directory.
    #[error("snapshot directory {} cannot share data with data directory {} (reflink across them failed); put it on the data directory's file system", snapshot_dir.display(), data_dir.display())]
    OtherFileSystem {
        /// The data directory.
        data_dir: PathBuf,
        /// The snapshot directory.
        snapshot_dir: PathBuf,
    },
    /// The data directory is not a PostgreSQL data directory.
    #[error("{} is not a PostgreSQL data directory (no PG_VERSION)", .0.display())]
    NotADataDirectory(PathBuf),
    /// Opening the directories failed.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// The TLS certificate or key could not be loaded.
    #[error("TLS: {0}")]
    Tls(String),
}

/// A running agent's state: its directories, credential verifier and free-space floor.
#[derive(Debug)]
pub struct Agent {
    store: SnapshotStore,
    verifier: Verifier,
    min_free: FreeFloor,
    servers: CloneServers,
}

impl Agent {
    /// Opens `layout` (creating the snapshot and clone directories), checks that the data
    /// directory's file system can clone files into the snapshot directory, and returns the
    /// agent ready to serve requests signed with `key`.
    pub fn start(layout: Layout, key: AgentKey, min_free: FreeFloor) -> Result<Agent, StartError> {
        if !layout.data_dir.join("PG_VERSION").is_file() {
            return Err(StartError::NotADataDirectory(layout.data_dir.clone()));
        }
        let store = SnapshotStore::open(layout)?;
        let fs = store.probe()?;
        if !fs.reflink {
            let layout = store.layout();
            let snapshot_fs_can = cow::probe(&layout.snapshot_dir)
                .map(|i| i.reflink)
                .unwrap_or(false);
            return Err(if snapshot_fs_can {
                StartError::OtherFileSystem {
                    data_dir: layout.data_dir.clone(),
                    snapshot_dir: layout.snapshot_dir.clone(),
                }
            } else {
                StartError::NotCopyOnWrite {
                    data_dir: layout.data_dir.clone(),
                    fs_type: fs.fs_type,
                }
            });
        }
        let latest_request = store.layout().snapshot_dir.join(LATEST_REQUEST_FILE);
        let verifier = Verifier::recording(key, first_whole_second(), latest_request.clone())
            .map_err(|source| SnapshotError::Io {
                op: "read",
                path: latest_request,
                source,
            })?;
        Ok(Agent {
            store,
            verifier,
            min_free,
            servers: CloneServers::default(),
        })
    }

    /// The same agent running clones' servers with `pg_ctl` from `dir` (`--pg-bin`) instead of
    /// `/usr/lib/postgresql/<major>/bin`.
    pub fn with_pg_bin(mut self, dir: PathBuf) -> Agent {
        self.servers.pg_bin = Some(dir);
        self
    }

    /// Starts, stops and reports clones' servers.
    pub fn servers(&self) -> &CloneServers {
        &self.servers
    }

    /// Deletes clone `clone`, stopping its server first.
    pub fn delete_clone(&self, clone: &CloneName) -> Result<(), SnapshotError> {
        self.servers.stop(&self.store, clone, true)?;
        self.store.delete_clone(clone)
    }

    /// The snapshots and clones this agent serves.
    pub fn store(&self) -> &SnapshotStore {
        &self.store
    }

    /// Facts about the host: the data directory's file system and cluster.
    pub fn facts(&self) -> Result<HostFacts, SnapshotError> {
        let layout = self.store.layout();
        let fs = self.store.probe()?;
        let pg_major = read_head(&layout.data_dir.join("PG_VERSION"), 16)
            .and_then(|v| String::from_utf8(v).ok())
            .and_then(|v| v.trim().split('.').next().and_then(|m| m.parse().ok()));
        Ok(HostFacts {
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            data_dir: layout.data_dir.clone(),
            snapshot_dir: layout.snapshot_dir.clone(),
            clone_dir: layout.clone_dir.clone(),
            fs,
            min_free: self.min_free,
            pg_major,
            system_identifier: system_identifier(&layout.data_dir),
        })
    }

    /// The HTTP routes, every one behind the signature check.
    pub fn router(self: Arc<Self>) -> Router {
        Router::new()
            .route("/v1/facts", get(facts))
            .route("/v1/snapshots", get(list_snapshots))
            .route(
                "/v1/snapshots/{name}",
                post(create_snapshot).delete(delete_snapshot),
            )
            .route("/v1/snapshots/{name}/labels", put(put_labels))
            .route("/v1/snapshots/{name}/manifest", get(manifest))
            .route("/v1/snapshots/{name}/space", get(space))
            .route("/v1/snapshots/{name}/file", get(read_file))
            .route("/v1/snapshots/{name}/changes", get(changes))
            .route("/v1/snapshots/{name}/wal", post(add_snapshot_wal))
            .route("/v1/snapshots/{name}/wal/{file}", put(put_snapshot_wal))
            .route(
                "/v1/clones/{name}",
                post(create_clone).delete(delete_clone).get(clone_status),
            )
            .route("/v1/clones/{name}/start", post(start_clone))
            .route("/v1/clones/{name}/stop", post(stop_clone))
            .route("/v1/clones/{name}/wal/{file}", put(put_clone_wal))
            .fallback(not_found)
            // Bodies are read, bounded, by the signature check.
            .layer(axum::extract::DefaultBodyLimit::disable())
            .layer(middleware::from_fn_with_state(self.clone(), authenticate))
            .with_state(self)
    }
}

/// In the snapshot directory: the latest request time the agent accepted (see
/// [`Verifier::recording`]).
pub const LATEST_REQUEST_FILE: &str = "agent.latest-request";

/// The next whole second, once it has come: every request signed before it was signed before
/// this agent started (see [`Verifier::new`]), and a client on the same clock is never refused.
fn first_whole_second() -> i64 {
    let next = unix_now() + 1;
    let due = std::time::UNIX_EPOCH + Duration::from_secs(next.max(0) as u64);
    if let Ok(wait) = due.duration_since(std::time::SystemTime::now()) {
        std::thread::sleep(wait);
    }
    next
}

/// The cluster's system identifier: `ControlFileData.system_identifier`, the first field of
/// `global/pg_control` (src/include/catalog/pg_control.h), in the host's byte order.
fn system_identifier(data_dir: &Path) -> Option<u64> {
    let head = read_head(&data_dir.join("global/pg_control"), 8)?;
    Some(u64::from_ne_bytes(head.try_into().ok()?))
}

/// At most `max` bytes from the start of the regular file `path`, never through a symlink at
/// its last component nor from a FIFO or device the data directory's owner might plant.
fn read_head(path: &Path, max: u64) -> Option<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .ok()?;
    if !f.metadata().ok()?.is_file() {
        return None;
    }
    let mut head = Vec::new();
    f.take(max).read_to_end(&mut head).ok()?;
    Some(head)
}

/// A refusal as the API sends it.
struct ApiError(ErrorCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.0.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = ErrorBody {
            code: self.0,
            message: self.1.replace('\n', "; "),
            not_before: None,
        };
        (status, Json(body)).into_response()
    }
}

impl From<SnapshotError> for ApiError {
    fn from(e: SnapshotError) -> Self {
        let code = match &e {
            SnapshotError::InvalidName(_) | SnapshotError::InvalidParameter(_) => {
                ErrorCode::InvalidParameter
            }
            SnapshotError::NotFound(_) => ErrorCode::NotFound,
            SnapshotError::Exists(_) => ErrorCode::Exists,
            SnapshotError::LowSpace(_) => ErrorCode::LowSpace,
            SnapshotError::Refused(_) => ErrorCode::Refused,
            SnapshotError::Cow(_) | SnapshotError::Io { .. } => ErrorCode::Internal,
        };
        if code == ErrorCode::Internal {
            tracing::warn!("agent request failed: {e}");
        }
        ApiError(code, e.to_string())
    }
}

impl From<crate::names::InvalidName> for ApiError {
    fn from(e: crate::names::InvalidName) -> Self {
        ApiError(ErrorCode::InvalidParameter, e.to_string())
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// Runs disk work on the blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, SnapshotError> + Send + 'static,
) -> ApiResult<T> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(ApiError::from),
        Err(e) => Err(ApiError(
            ErrorCode::Internal,
            format!("agent task failed: {e}"),
        )),
    }
}

/// Marks an answer whose body is streamed: sealed in a trailer rather than a header.
#[derive(Debug, Clone, Copy)]
struct Streamed;

/// Header of a streamed file range: its length (a sealed answer is sent chunked, without
/// `content-length`).
pub const HEADER_RANGE_LENGTH: &str = "x-strata-range-length";

async fn authenticate(State(agent): State<Arc<Agent>>, req: Request, next: Next) -> Response {
    // The nonce as sent, whatever it is: the client checks the seal against its own.
    let nonce = req
        .headers()
        .get(crate::auth::HEADER_NONCE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let response = check_then_run(&agent, req, next).await;
    seal(agent.verifier.seal(&nonce), response).await
}

/// Seals an answer: a MAC over its status, body and the request's nonce (see `auth`).
async fn seal(mut seal: crate::auth::ResponseSeal, response: Response) -> Response {
    let (mut parts, body) = response.into_parts();
    let status = parts.status.as_u16();
    if parts.extensions.remove::<Streamed>().is_some() {
        parts.headers.remove(header::CONTENT_LENGTH);
        parts.headers.insert(
            header::TRAILER,
            HeaderValue::from_static(crate::auth::HEADER_RESPONSE_MAC),
        );
        let frames = futures::stream::unfold(
            (body.into_data_stream(), Some(seal)),
            move |(mut data, seal)| async move {
                let mut seal = seal?;
                match futures::StreamExt::next(&mut data).await {
                    Some(Ok(chunk)) => {
                        seal.update(&chunk);
                        Some((Ok(hyper::body::Frame::data(chunk)), (data, Some(seal))))
                    }
                    // The client sees the stream break off and no trailer.
                    Some(Err(e)) => Some((Err(e), (data, None))),
                    None => {
                        let mut trailers = axum::http::HeaderMap::new();
                        let mac = HeaderValue::from_str(&seal.seal(status))
                            .unwrap_or(HeaderValue::from_static(""));
                        trailers.insert(crate::auth::HEADER_RESPONSE_MAC, mac);
                        Some((Ok(hyper::body::Frame::trailers(trailers)), (data, None)))
                    }
                }
            },
        );
        return Response::from_parts(parts, Body::new(http_body_util::StreamBody::new(frames)));
    }
    let bytes = match axum::body::to_bytes(body, usize::MAX).await {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!("agent answer could not be read for sealing: {e}");
            return StatusCode::INTERNAL_SERVER_ERROR.into_response();
        }
    };
    seal.update(&bytes);
    if let Ok(mac) = HeaderValue::from_str(&seal.seal(status)) {
        parts.headers.insert(crate::auth::HEADER_RESPONSE_MAC, mac);
    }
    Response::from_parts(parts, Body::from(bytes))
}

/// Checks the request's signature (reading its body, bounded) and runs it.
async fn check_then_run(agent: &Arc<Agent>, req: Request, next: Next) -> Response {
    let (parts, body) = req.into_parts();
    // Signature and clock first: only a signed request may make the agent read a body.
    let head = agent.verifier.verify_head(
        parts.method.as_str(),
        parts.uri.path(),
        parts.uri.query().unwrap_or(""),
        |name| parts.headers.get(name).and_then(|v| v.to_str().ok()),
        unix_now(),
    );
    if let Err(refusal) = head {
        tracing::info!(method = %parts.method, path = %parts.uri.path(), "agent refused a request: {refusal}");
        return unauthorized(agent, refusal);
    }
    // A signed head is proof enough to keep the connection's slot while a long body comes
    // (a replayed one fails the full check below, which closes the connection).
    let connection = parts.extensions.get::<ConnectionState>().cloned();
    if let Some(c) = &connection {
        c.signed.store(true, Ordering::Relaxed);
    }
    // A WAL file may be as large as the cluster's segments; every other body is small.
    let wal_limit = if is_wal_upload(parts.method.as_str(), parts.uri.path()) {
        let a = agent.clone();
        tokio::task::spawn_blocking(move || a.store.wal_segment_size().ok())
            .await
            .ok()
            .flatten()
    } else {
        None
    };
    let limit = wal_limit.map_or(MAX_REQUEST_BODY, |l| l as usize);
    let idle = connection.map_or(Limits::default().head_timeout, |c| c.body_idle);
    let bytes = match read_body(body, limit, idle).await {
        Ok(b) => b,
        Err(BodyError::Stalled) => {
            tracing::info!(method = %parts.method, path = %parts.uri.path(), "request body stalled for {idle:?}");
            return (
                StatusCode::REQUEST_TIMEOUT,
                [(header::CONNECTION, HeaderValue::from_static("close"))],
                Json(ErrorBody {
                    code: ErrorCode::Refused,
                    message: format!("no byte of the request body came for {idle:?}"),
                    not_before: None,
                }),
            )
                .into_response();
        }
        Err(BodyError::Broken(e)) => {
            tracing::debug!(method = %parts.method, path = %parts.uri.path(), "request body: {e}");
            return StatusCode::BAD_REQUEST.into_response();
        }
        Err(BodyError::TooLarge) if wal_limit.is_some() => {
            return ApiError(
                ErrorCode::InvalidParameter,
                format!("a WAL file holds at most {limit} bytes (the cluster's segment size)"),
            )
            .into_response()
        }
        Err(BodyError::TooLarge) => {
            return (
                StatusCode::PAYLOAD_TOO_LARGE,
                Json(ErrorBody {
                    code: ErrorCode::Refused,
                    message: format!("request body over {MAX_REQUEST_BODY} bytes"),
                    not_before: None,
                }),
            )
                .into_response()
        }
    };
    let verified = agent.verifier.verify(
        parts.method.as_str(),
        parts.uri.path(),
        parts.uri.query().unwrap_or(""),
        |name| parts.headers.get(name).and_then(|v| v.to_str().ok()),
        &bytes,
        unix_now(),
    );
    if let Err(refusal) = verified {
        tracing::info!(method = %parts.method, path = %parts.uri.path(), "agent refused a request: {refusal}");
        return unauthorized(agent, refusal);
    }
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}

/// Why a request's body was not read whole.
enum BodyError {
    /// Longer than allowed.
    TooLarge,
    /// No byte came for the connection's idle time.
    Stalled,
    /// The connection broke, or the body was malformed.
    Broken(String),
}

/// Reads a request body of at most `limit` bytes, each piece due within `idle` of the one
/// before: a client that stops sending mid-body (or never sends the body it announced) would
/// otherwise hold its connection, and a slot, for as long as the socket stays open.
async fn read_body(body: Body, limit: usize, idle: Duration) -> Result<Bytes, BodyError> {
    use http_body_util::BodyExt;
    let mut body = http_body_util::Limited::new(body, limit);
    let mut out = bytes::BytesMut::new();
    loop {
        match tokio::time::timeout(idle, body.frame()).await {
            Err(_) => return Err(BodyError::Stalled),
            Ok(None) => return Ok(out.freeze()),
            Ok(Some(Err(e))) if e.is::<http_body_util::LengthLimitError>() => {
                return Err(BodyError::TooLarge)
            }
            Ok(Some(Err(e))) => return Err(BodyError::Broken(e.to_string())),
            Ok(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    out.extend_from_slice(data);
                }
            }
        }
    }
}

/// A 401 naming the earliest request time accepted.
fn unauthorized(agent: &Agent, refusal: crate::auth::AuthRefusal) -> Response {
    let body = ErrorBody {
        code: ErrorCode::Unauthorized,
        message: refusal.0.replace('\n', "; "),
        not_before: Some(agent.verifier.not_before()),
    };
    // A peer without the key has no use for the connection: closing it frees
    // its slot at once.
    (
        StatusCode::UNAUTHORIZED,
        [(header::CONNECTION, HeaderValue::from_static("close"))],
        Json(body),
    )
        .into_response()
}

async fn not_found() -> ApiError {
    ApiError(ErrorCode::NotFound, "no such agent endpoint".into())
}

async fn facts(State(agent): State<Arc<Agent>>) -> ApiResult<Json<HostFacts>> {
    let a = agent.clone();
    Ok(Json(blocking(move || a.facts()).await?))
}

async fn list_snapshots(State(agent): State<Arc<Agent>>) -> ApiResult<Response> {
    let a = agent.clone();
    Ok(Json(blocking(move || a.store.list()).await?).into_response())
}

async fn create_snapshot(
    State(agent): State<Arc<Agent>>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<Response> {
    let name = SnapshotName::new(&name)?;
    let a = agent.clone();
    let created = blocking(move || a.store.create(&name, a.min_free)).await?;
    Ok((StatusCode::CREATED, Json(created)).into_response())
}

async fn delete_snapshot(
    State(agent): State<Arc<Agent>>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<StatusCode> {
    let name = SnapshotName::new(&name)?;
    let a = agent.clone();
    blocking(move || a.store.delete(&name)).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn put_labels(
    State(agent): State<Arc<Agent>>,
    UrlPath(name): UrlPath<String>,
    body: Bytes,
) -> ApiResult<StatusCode> {
    let name = SnapshotName::new(&name)?;
    let labels: Labels = serde_json::from_slice(&body)
        .map_err(|e| ApiError(ErrorCode::InvalidParameter, format!("labels: {e}")))?;
    let a = agent.clone();
    blocking(move || a.store.write_labels(&name, &labels)).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn manifest(
    State(agent): State<Arc<Agent>>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<Response> {
    let name = SnapshotName::new(&name)?;
    let a = agent.clone();
    Ok(Json(blocking(move || a.store.manifest(&name)).await?).into_response())
}

async fn space(
    State(agent): State<Arc<Agent>>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<Json<SpaceEstimate>> {
    let name = SnapshotName::new(&name)?;
    let a = agent.clone();
    let estimate = blocking(move || {
        let logical_bytes = a.store.manifest(&name)?.total_bytes();
        let exclusive_bytes = a.store.space_estimate(&name)?;
        Ok(SpaceEstimate {
            exclusive_bytes,
            logical_bytes,
        })
    })
    .await?;
    Ok(Json(estimate))
}

async fn changes(
    State(agent): State<Arc<Agent>>,
    UrlPath(name): UrlPath<String>,
    Query(q): Query<ChangesQuery>,
) -> ApiResult<Response> {
    let name = SnapshotName::new(&name)?;
    let since = SnapshotName::new(&q.since)?;
    let a = agent.clone();
    Ok(Json(blocking(move || a.store.changed_ranges(&name, &since)).await?).into_response())
}

async fn read_file(
    State(agent): State<Arc<Agent>>,
    UrlPath(name): UrlPath<String>,
    Query(q): Query<FileQuery>,
) -> ApiResult<Response> {
    let name = SnapshotName::new(&name)?;
    let path = RelPath::new(&q.path)?;
    let a = agent.clone();
    let file = blocking(move || a.store.open_file(&name, &path)).await?;
    let size = file
        .metadata()
        .map_err(|e| ApiError(ErrorCode::Internal, format!("stat: {e}")))?
        .len();
    if q.offset > size {
        return Err(ApiError(
            ErrorCode::Refused,
            format!(
                "offset {} is beyond the file's end ({size} bytes)",
                q.offset
            ),
        ));
    }
    let len = q.len.min(size - q.offset).min(MAX_READ_LEN);
    let mut file = tokio::fs::File::from_std(file);
    file.seek(SeekFrom::Start(q.offset))
        .await
        .map_err(|e| ApiError(ErrorCode::Internal, format!("seek: {e}")))?;
    let stream = futures::stream::unfold(Some(file.take(len)), |state| async move {
        let mut reader = state?;
        let mut buf = vec![0u8; 256 * 1024];
        match reader.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok::<_, io::Error>(Bytes::from(buf)), Some(reader)))
            }
            Err(e) => Some((Err(e), None)),
        }
    });
    let mut response = Body::from_stream(stream).into_response();
    response.extensions_mut().insert(Streamed);
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert(HEADER_RANGE_LENGTH, HeaderValue::from(len));
    Ok(response)
}

async fn create_clone(
    State(agent): State<Arc<Agent>>,
    UrlPath(name): UrlPath<String>,
    body: Bytes,
) -> ApiResult<Response> {
    let clone = CloneName::new(&name)?;
    let req: CloneRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError(ErrorCode::InvalidParameter, format!("clone request: {e}")))?;
    let a = agent.clone();
    let created = blocking(move || a.store.clone_snapshot(&req.snapshot, &clone)).await?;
    Ok((StatusCode::CREATED, Json(created)).into_response())
}

async fn delete_clone(
    State(agent): State<Arc<Agent>>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<StatusCode> {
    let clone = CloneName::new(&name)?;
    let a = agent.clone();
    blocking(move || a.delete_clone(&clone)).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn clone_status(
    State(agent): State<Arc<Agent>>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<Response> {
    let clone = CloneName::new(&name)?;
    let a = agent.clone();
    Ok(Json(blocking(move || a.servers.status(&a.store, &clone)).await?).into_response())
}

async fn start_clone(
    State(agent): State<Arc<Agent>>,
    UrlPath(name): UrlPath<String>,
    body: Bytes,
) -> ApiResult<Response> {
    let clone = CloneName::new(&name)?;
    let req: StartRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError(ErrorCode::InvalidParameter, format!("start request: {e}")))?;
    let a = agent.clone();
    let started = blocking(move || a.servers.start(&a.store, &clone, &req)).await?;
    Ok(Json(started).into_response())
}

async fn stop_clone(
    State(agent): State<Arc<Agent>>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<Response> {
    let clone = CloneName::new(&name)?;
    let a = agent.clone();
    Ok(Json(blocking(move || a.servers.stop(&a.store, &clone, false)).await?).into_response())
}

async fn put_clone_wal(
    State(agent): State<Arc<Agent>>,
    UrlPath((name, file)): UrlPath<(String, String)>,
    body: Bytes,
) -> ApiResult<StatusCode> {
    let target = WalTarget::Clone(CloneName::new(&name)?);
    put_wal(agent, target, &file, body).await
}

async fn put_snapshot_wal(
    State(agent): State<Arc<Agent>>,
    UrlPath((name, file)): UrlPath<(String, String)>,
    body: Bytes,
) -> ApiResult<StatusCode> {
    let target = WalTarget::Snapshot(SnapshotName::new(&name)?);
    put_wal(agent, target, &file, body).await
}

async fn put_wal(
    agent: Arc<Agent>,
    target: WalTarget,
    file: &str,
    body: Bytes,
) -> ApiResult<StatusCode> {
    let file = WalFileName::new(file)?;
    let a = agent.clone();
    blocking(move || a.store.put_wal(&target, &file, &body)).await?;
    Ok(StatusCode::CREATED)
}

async fn add_snapshot_wal(
    State(agent): State<Arc<Agent>>,
    UrlPath(name): UrlPath<String>,
    body: Bytes,
) -> ApiResult<Response> {
    let name = SnapshotName::new(&name)?;
    let req: WalRangeRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError(ErrorCode::InvalidParameter, format!("WAL range: {e}")))?;
    let a = agent.clone();
    let added = blocking(move || a.store.add_wal_range(&name, &req.first, &req.last)).await?;
    Ok((StatusCode::CREATED, Json(added)).into_response())
}

/// Certificate chain and private key (PEM files) for HTTPS.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The certificate chain (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
}

/// Loads the TLS certificate and key (the same way the API does).
pub fn tls_acceptor(files: &TlsFiles) -> Result<tokio_rustls::TlsAcceptor, StartError> {
    let read =
        |p: &Path| std::fs::read(p).map_err(|e| StartError::Tls(format!("{}: {e}", p.display())));
    let certs = rustls_pemfile::certs(&mut &read(&files.cert)?[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| StartError::Tls(format!("{}: {e}", files.cert.display())))?;
    if certs.is_empty() {
        return Err(StartError::Tls(format!(
            "{}: no PEM certificate found",
            files.cert.display()
        )));
    }
    let key = rustls_pemfile::private_key(&mut &read(&files.key)?[..])
        .map_err(|e| StartError::Tls(format!("{}: {e}", files.key.display())))?
        .ok_or_else(|| {
            StartError::Tls(format!("{}: no PEM private key found", files.key.display()))
        })?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| StartError::Tls(e.to_string()))?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| StartError::Tls(format!("certificate/key: {e}")))?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// How many connections the agent serves at once and how long a client has to say what it
/// wants. When every slot is taken, a new connection takes the slot of one that has not yet
/// made a signed request (see [`Slots`]); it waits only while all of them have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections served at once; more wait in the listen queue until one ends.
    pub max_connections: usize,
    /// Time a client has for the TLS handshake and for sending each request's head, from the
    /// connection's start or the end of its previous answer (an idle connection is closed),
    /// and the longest a request's body may stall.
    pub head_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 64,
            head_timeout: Duration::from_secs(30),
        }
    }
}

/// Serves `agent` on `listener` (HTTPS with `tls`) until `shutdown` turns true, within the
/// default [`Limits`]: 64 connections, 30 s for each request's head.
pub async fn serve(
    listener: TcpListener,
    agent: Arc<Agent>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: watch::Receiver<bool>,
) -> io::Result<()> {
    serve_with_limits(listener, agent, tls, Limits::default(), shutdown).await
}

/// [`serve`] within other `limits`.
pub async fn serve_with_limits(
    listener: TcpListener,
    agent: Arc<Agent>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    limits: Limits,
    mut shutdown: watch::Receiver<bool>,
) -> io::Result<()> {
    let router = agent.router();
    let permits = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let slots = Arc::new(Slots::default());
    let head_timeout = limits.head_timeout;
    loop {
        let (stream, peer): (tokio::net::TcpStream, SocketAddr) = tokio::select! {
            r = listener.accept() => match r {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of descriptors or a connection reset before accept: try again soon.
                    tracing::warn!("accepting a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = stopped(&mut shutdown) => return Ok(()),
        };
        let permit = match permits.clone().try_acquire_owned() {
            Ok(p) => p,
            // Every slot is taken: one held by a connection that has signed
            // nothing for UNSIGNED_GRACE goes to this one; else it waits,
            // looking again now and then.
            Err(_) => loop {
                slots.evict_unsigned(UNSIGNED_GRACE);
                tokio::select! {
                    p = permits.clone().acquire_owned() => break p.map_err(io::Error::other)?,
                    () = tokio::time::sleep(EVICTION_RECHECK) => {}
                    () = stopped(&mut shutdown) => return Ok(()),
                }
            },
        };
        let acceptor = tls.clone();
        let held = slots.hold(peer);
        let svc = hyper_util::service::TowerToHyperService::new(router.clone().layer(
            axum::Extension(ConnectionState {
                signed: held.signed.clone(),
                body_idle: head_timeout,
            }),
        ));
        tokio::spawn(async move {
            let _permit = permit;
            let served = async move {
                let Some(acceptor) = acceptor else {
                    let io = hyper_util::rt::TokioIo::new(stream);
                    return serve_connection(io, svc, peer, head_timeout).await;
                };
                match tokio::time::timeout(head_timeout, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => {
                        let io = hyper_util::rt::TokioIo::new(tls);
                        serve_connection(io, svc, peer, head_timeout).await
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, "TLS handshake failed: {e}"),
                    Err(_) => {
                        tracing::debug!(%peer, "TLS handshake not done in {head_timeout:?}")
                    }
                }
            };
            tokio::pin!(served);
            loop {
                tokio::select! {
                    () = &mut served => return,
                    () = held.evict.notified() => {
                        // Signed since it was chosen: it keeps its slot.
                        if !held.signed.load(Ordering::Relaxed) {
                            tracing::debug!(%peer, "closed a connection that had signed no request: its slot went to a new one");
                            return;
                        }
                    }
                }
            }
        });
    }
}

/// How long a connection may hold a slot without signing a request head before a new
/// connection may take it (see [`Slots`]): far longer than a client with the key takes to
/// connect and send one, even with TLS, so the server's own connections, opened many at once,
/// never take each other's slots.
const UNSIGNED_GRACE: Duration = Duration::from_secs(2);

/// While a new connection waits for a slot, how often the slots are looked at again for one
/// to give it.
const EVICTION_RECHECK: Duration = Duration::from_millis(250);

/// What requests know of their connection.
#[derive(Clone)]
struct ConnectionState {
    /// Set once a request head on it passed the signature check.
    signed: Arc<AtomicBool>,
    /// How long its request bodies may stall: the head time.
    body_idle: Duration,
}

/// The connections being served. A peer without the key can open connections and hold them
/// until their head time is up, again and again; were slots first come, first served, it could
/// keep every one of them and so the agent from Strata. A connection that has signed no request
/// head for [`UNSIGNED_GRACE`] is therefore the first to go when all are taken: of the peer
/// address (an IPv6 /64, where one host holds many) holding most such connections (a flood
/// from one address empties itself first), the oldest.
#[derive(Default)]
struct Slots(std::sync::Mutex<SlotTable>);

#[derive(Default)]
struct SlotTable {
    next: u64,
    held: std::collections::BTreeMap<u64, HeldSlot>,
}

#[derive(Clone)]
struct HeldSlot {
    peer: std::net::IpAddr,
    since: std::time::Instant,
    signed: Arc<AtomicBool>,
    evict: Arc<tokio::sync::Notify>,
}

/// One connection's entry in [`Slots`], removed when dropped.
struct Held {
    slots: Arc<Slots>,
    id: u64,
    signed: Arc<AtomicBool>,
    evict: Arc<tokio::sync::Notify>,
}

impl Slots {
    fn table(&self) -> std::sync::MutexGuard<'_, SlotTable> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn hold(self: &Arc<Self>, peer: SocketAddr) -> Held {
        let slot = HeldSlot {
            peer: peer_group(peer.ip()),
            since: std::time::Instant::now(),
            signed: Arc::new(AtomicBool::new(false)),
            evict: Arc::new(tokio::sync::Notify::new()),
        };
        let mut table = self.table();
        let id = table.next;
        table.next += 1;
        table.held.insert(id, slot.clone());
        Held {
            slots: self.clone(),
            id,
            signed: slot.signed,
            evict: slot.evict,
        }
    }

    /// Asks one connection that has signed nothing for `grace`, if there is one, to close
    /// (see [`Slots`]).
    fn evict_unsigned(&self, grace: Duration) {
        let table = self.table();
        // Per peer address: how many such connections it holds, and its oldest (ids grow,
        // and the map is ordered by them: the first seen is the oldest).
        let mut per_peer = std::collections::HashMap::new();
        for (&id, s) in &table.held {
            if !s.signed.load(Ordering::Relaxed) && s.since.elapsed() >= grace {
                per_peer.entry(s.peer).or_insert((0usize, id, s)).0 += 1;
            }
        }
        // The peer holding most; of peers holding as many, the one with the oldest.
        let chosen = per_peer
            .into_values()
            .max_by_key(|&(n, oldest, _)| (n, std::cmp::Reverse(oldest)));
        if let Some((_, _, s)) = chosen {
            s.evict.notify_one();
        }
    }
}

/// The address a peer is counted under: its IPv4 address, or the /64 of its IPv6 one.
fn peer_group(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip {
        std::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => std::net::IpAddr::V4(v4),
            None => std::net::IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        },
        v4 => v4,
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.slots.table().held.remove(&self.id);
    }
}

/// Resolves once `shutdown` turns true (the guard `wait_for` returns is not `Send`).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}

/// HTTP/1.1 on one accepted connection, each request head due within `head_timeout`. Only
/// HTTP/1.1, which is all the client speaks: detecting HTTP/2 would first wait, with no time
/// limit, for bytes a silent client never sends.
async fn serve_connection<I>(
    io: I,
    svc: hyper_util::service::TowerToHyperService<Router>,
    peer: SocketAddr,
    head_timeout: Duration,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let served = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(head_timeout)
        .serve_connection(io, svc)
        .await;
    if let Err(e) = served {
        tracing::debug!(%peer, "connection: {e}");
    }
}

#[cfg(test)]
mod slot_tests {
    use futures::FutureExt;

    use super::*;

    fn hold(slots: &Arc<Slots>, addr: &str) -> Held {
        slots.hold(addr.parse().unwrap())
    }

    fn told_to_close(held: &Held) -> bool {
        held.evict.notified().now_or_never().is_some()
    }

    #[test]
    fn stale_unsigned_connections_of_the_busiest_address_go_first() {
        let slots = Arc::new(Slots::default());
        let v4 = hold(&slots, "192.0.2.9:4000");
        // Two addresses of one IPv6 /64 count as one peer, holding most.
        let first = hold(&slots, "[2001:db8::1]:4000");
        let second = hold(&slots, "[2001:db8::2]:4000");
        // Within the grace, nobody is told to close.
        slots.evict_unsigned(Duration::from_secs(60));
        assert!(![&v4, &first, &second].iter().any(|h| told_to_close(h)));

        slots.evict_unsigned(Duration::ZERO);
        assert!(told_to_close(&first));
        assert!(!told_to_close(&v4) && !told_to_close(&second));
        drop(first);
        // One each: the older goes, a signed one never.
        second.signed.store(true, Ordering::Relaxed);
        slots.evict_unsigned(Duration::ZERO);
        assert!(told_to_close(&v4) && !told_to_close(&second));
        drop(v4);
        slots.evict_unsigned(Duration::ZERO);
        assert!(!told_to_close(&second));
        assert_eq!(slots.table().held.len(), 1);
        drop(second);
        assert!(slots.table().held.is_empty());
        assert_eq!(
            peer_group("::ffff:192.0.2.1".parse().unwrap()),
            "192.0.2.1".parse::<std::net::IpAddr>().unwrap()
        );
    }
}
