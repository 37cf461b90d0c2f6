//! The Strata server's side of the agent protocol: [`AgentClient`], one typed method per
//! endpoint, every request signed.
//!
//! Each call opens its own HTTP/1.1 connection (plain or rustls) with hyper: calls are few and
//! long (a snapshot, a whole file), so pooling would save nothing worth its state. Errors say
//! which of three things happened: the agent could not be reached ([`AgentError::Unreachable`]),
//! it refused the credential ([`AgentError::Unauthorized`]), or it refused the request itself
//! ([`AgentError::Refused`], with the agent's [`ErrorCode`] and message).
//!
//! Every answer must carry the agent's MAC (see `auth`); one without it, or with a wrong one,
//! is refused as [`AgentError::Forged`] before anything in it is used. A streamed file range
//! carries its MAC in a trailer: [`RangeReader`] fails at the end when it does not verify.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use tokio::net::TcpStream;

use crate::auth::{new_nonce, sign, unix_now, AgentKey, ResponseSeal, HEADER_RESPONSE_MAC};
use crate::clone_server::{CloneStarted, CloneStatus, StartRequest};
use crate::names::{CloneName, RelPath, SnapshotName};
use crate::proto::{
    encode_query_value, CloneCreated, CloneRequest, ErrorBody, ErrorCode, FileChanges, HostFacts,
    Labels, Manifest, SnapshotCreated, SnapshotInfo, SpaceEstimate,
};
use crate::wal::{WalAdded, WalFileName, WalRangeRequest};

/// Largest JSON answer read (a manifest or change list of a very large cluster).
const MAX_JSON_ANSWER: usize = 512 * 1024 * 1024;

/// What went wrong talking to an agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The agent URL or TLS trust file is unusable.
    #[error("agent URL {url}: {reason}")]
    Config {
        /// The URL as given.
        url: String,
        /// Why.
        reason: String,
    },
    /// No connection: refused, timed out, reset, name not resolved.
    #[error("agent at {url} unreachable: {reason}")]
    Unreachable {
        /// The agent's URL.
        url: String,
        /// What the connection attempt said.
        reason: String,
    },
    /// The TLS handshake failed (e.g. the certificate is not trusted).
    #[error("TLS with agent at {url} failed: {reason}")]
    Tls {
        /// The agent's URL.
        url: String,
        /// The handshake's error.
        reason: String,
    },
    /// The agent refused the signature (wrong key, clock skew, replay).
    #[error("agent at {url} refused the credential: {reason}")]
    Unauthorized {
        /// The agent's URL.
        url: String,
        /// The agent's one-line reason.
        reason: String,
    },
    /// The agent refused or failed the request.
    #[error("agent at {url} refused: {message}")]
    Refused {
        /// The agent's URL.
        url: String,
        /// The HTTP status.
        status: u16,
        /// The kind of refusal.
        code: ErrorCode,
        /// The agent's one-line message.
        message: String,
    },
    /// The answer does not carry a valid MAC of the agent's: it was altered on the way or does
    /// not come from the agent holding the key.
    #[error("refused an answer claiming to be from agent at {url}: {reason}")]
    Forged {
        /// The agent's URL.
        url: String,
        /// What was wrong with the MAC.
        reason: String,
    },
    /// The answer was not what the protocol promises.
    #[error("agent at {url} answered unexpectedly: {reason}")]
    Protocol {
        /// The agent's URL.
        url: String,
        /// What was wrong.
        reason: String,
    },
}

impl AgentError {
    /// The agent's refusal kind, if it refused.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            AgentError::Refused { code, .. } => Some(*code),
            AgentError::Unauthorized { .. } => Some(ErrorCode::Unauthorized),
            _ => None,
        }
    }

    /// Whether the agent could not be reached at all (worth retrying later).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, AgentError::Unreachable { .. })
    }
}

/// Connect and request time limits.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// TCP connect and TLS handshake.
    pub connect: Duration,
    /// From sending a request to its answer's headers (a snapshot or clone takes longest),
    /// and the longest wait for the next bytes of an answer's body.
    pub request: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(10),
            request: Duration::from_secs(600),
        }
    }
}

/// A client of one agent.
#[derive(Clone)]
pub struct AgentClient {
    url: String,
    host: String,
    port: u16,
    key: AgentKey,
    tls: Option<tokio_rustls::TlsConnector>,
    timeouts: Timeouts,
    /// Seconds added to this host's clock when signing (0 but in tests).
    clock_offset: i64,
}

impl std::fmt::Debug for AgentClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentClient")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl AgentClient {
    /// A client of the agent at `url` (`http://host:port` or `https://host:port`, no path)
    /// signing with `key`. For `https`, `ca_file` is the PEM certificate (or CA) to trust;
    /// it is required, since an agent's certificate is its own.
    pub fn new(
        url: &str,
        key: AgentKey,
        ca_file: Option<&Path>,
    ) -> Result<AgentClient, AgentError> {
        let config = |reason: String| AgentError::Config {
            url: url.to_string(),
            reason,
        };
        let uri: hyper::Uri = url.parse().map_err(|e| config(format!("{e}")))?;
        let https = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => return Err(config("the scheme must be http or https".into())),
        };
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err(config("give only scheme, host and port".into()));
        }
        let host = uri
            .host()
            .ok_or_else(|| config("no host".into()))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let tls = match (https, ca_file) {
            (false, None) => None,
            (false, Some(_)) => return Err(config("a CA file is only used with https".into())),
            (true, None) => {
                return Err(config(
                    "https needs the agent's certificate or CA file".into(),
                ))
            }
            (true, Some(ca)) => Some(tls_connector(ca).map_err(config)?),
        };
        Ok(AgentClient {
            url: url.trim_end_matches('/').to_string(),
            host,
            port,
            key,
            tls,
            timeouts: Timeouts::default(),
            clock_offset: 0,
        })
    }

    /// Whether requests go over TLS (`https`).
    pub fn uses_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Whether the agent's host is this machine's loopback (`localhost`,
    /// 127.0.0.0/8, `::1`), where plain HTTP never leaves the host.
    pub fn is_loopback(&self) -> bool {
        self.host.eq_ignore_ascii_case("localhost")
            || self
                .host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    }

    /// The same client with other time limits.
    pub fn with_timeouts(mut self, timeouts: Timeouts) -> AgentClient {
        self.timeouts = timeouts;
        self
    }

    /// The same client signing as if its clock were `secs` seconds off: how tests play a
    /// host whose clock is behind or ahead of the agent's.
    #[doc(hidden)]
    pub fn with_clock_offset(mut self, secs: i64) -> AgentClient {
        self.clock_offset = secs;
        self
    }

    /// The agent's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The host of its URL (an IPv6 address without brackets): where the
    /// database host is reached from here.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// Facts about the agent's host and cluster.
    pub async fn facts(&self) -> Result<HostFacts, AgentError> {
        self.json(Method::GET, "/v1/facts", "", Vec::new()).await
    }

    /// The agent's snapshots.
    pub async fn snapshots(&self) -> Result<Vec<SnapshotInfo>, AgentError> {
        self.json(Method::GET, "/v1/snapshots", "", Vec::new())
            .await
    }

    /// Takes snapshot `name` of the data directory (the caller holds the server in backup
    /// mode); refused when free space is under the agent's floor.
    pub async fn create_snapshot(
        &self,
        name: &SnapshotName,
    ) -> Result<SnapshotCreated, AgentError> {
        self.json(
            Method::POST,
            &format!("/v1/snapshots/{name}"),
            "",
            Vec::new(),
        )
        .await
    }

    /// Deletes snapshot `name`.
    pub async fn delete_snapshot(&self, name: &SnapshotName) -> Result<(), AgentError> {
        self.empty(
            Method::DELETE,
            &format!("/v1/snapshots/{name}"),
            "",
            Vec::new(),
        )
        .await
    }

    /// Writes `backup_label` and `tablespace_map` (from `pg_backup_stop()`) into snapshot `name`.
    pub async fn put_labels(&self, name: &SnapshotName, labels: &Labels) -> Result<(), AgentError> {
        let body = serde_json::to_vec(labels).map_err(|e| self.protocol(e.to_string()))?;
        self.empty(
            Method::PUT,
            &format!("/v1/snapshots/{name}/labels"),
            "",
            body,
        )
        .await
    }

    /// Every file and directory of snapshot `name`.
    pub async fn manifest(&self, name: &SnapshotName) -> Result<Manifest, AgentError> {
        self.json(
            Method::GET,
            &format!("/v1/snapshots/{name}/manifest"),
            "",
            Vec::new(),
        )
        .await
    }

    /// Snapshot `name`'s space estimate.
    pub async fn space(&self, name: &SnapshotName) -> Result<SpaceEstimate, AgentError> {
        self.json(
            Method::GET,
            &format!("/v1/snapshots/{name}/space"),
            "",
            Vec::new(),
        )
        .await
    }

    /// For every file of snapshot `name`, the ranges changed since snapshot `since`.
    pub async fn changed_ranges(
        &self,
        name: &SnapshotName,
        since: &SnapshotName,
    ) -> Result<Vec<FileChanges>, AgentError> {
        let query = format!("since={}", encode_query_value(since.as_str()));
        self.json(
            Method::GET,
            &format!("/v1/snapshots/{name}/changes"),
            &query,
            Vec::new(),
        )
        .await
    }

    /// Streams `len` bytes (fewer at the file's end) of file `path` of snapshot `name` from
    /// `offset`.
    pub async fn read_range(
        &self,
        name: &SnapshotName,
        path: &RelPath,
        offset: u64,
        len: u64,
    ) -> Result<RangeReader, AgentError> {
        let query = format!(
            "path={}&offset={offset}&len={len}",
            encode_query_value(path.as_str())
        );
        let (response, seal) = self
            .send(
                Method::GET,
                &format!("/v1/snapshots/{name}/file"),
                &query,
                Vec::new(),
            )
            .await?;
        let expected = response
            .headers()
            .get(crate::server::HEADER_RANGE_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or_else(|| {
                self.protocol(format!(
                    "file range without {}",
                    crate::server::HEADER_RANGE_LENGTH
                ))
            })?;
        if expected > len {
            return Err(self.protocol(format!(
                "file range of {expected} bytes announced for {len} asked"
            )));
        }
        Ok(RangeReader {
            url: self.url.clone(),
            status: response.status().as_u16(),
            body: response.into_body(),
            seal: Some(seal),
            expected,
            received: 0,
            idle: self.timeouts.request,
        })
    }

    /// [`read_range`](Self::read_range) collected into memory.
    pub async fn read_range_to_vec(
        &self,
        name: &SnapshotName,
        path: &RelPath,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>, AgentError> {
        let mut reader = self.read_range(name, path, offset, len).await?;
        let mut out = Vec::with_capacity(reader.expected.min(64 << 20) as usize);
        while let Some(chunk) = reader.next_chunk().await? {
            out.extend_from_slice(&chunk);
        }
        Ok(out)
    }

    /// Clones snapshot `snapshot` into the agent's clone directory as `clone`.
    pub async fn clone_snapshot(
        &self,
        snapshot: &SnapshotName,
        clone: &CloneName,
    ) -> Result<CloneCreated, AgentError> {
        let body = serde_json::to_vec(&CloneRequest {
            snapshot: snapshot.clone(),
        })
        .map_err(|e| self.protocol(e.to_string()))?;
        self.json(Method::POST, &format!("/v1/clones/{clone}"), "", body)
            .await
    }

    /// Starts a PostgreSQL server in clone `clone` (its configuration neutralized, see
    /// docs/AGENT.md); answers once it accepts connections.
    pub async fn start_clone(
        &self,
        clone: &CloneName,
        request: &StartRequest,
    ) -> Result<CloneStarted, AgentError> {
        let body = serde_json::to_vec(request).map_err(|e| self.protocol(e.to_string()))?;
        self.json(Method::POST, &format!("/v1/clones/{clone}/start"), "", body)
            .await
    }

    /// Stops clone `clone`'s server (fast shutdown) if it runs.
    pub async fn stop_clone(&self, clone: &CloneName) -> Result<CloneStatus, AgentError> {
        self.json(
            Method::POST,
            &format!("/v1/clones/{clone}/stop"),
            "",
            Vec::new(),
        )
        .await
    }

    /// Whether clone `clone`'s server runs, and on which port.
    pub async fn clone_status(&self, clone: &CloneName) -> Result<CloneStatus, AgentError> {
        self.json(Method::GET, &format!("/v1/clones/{clone}"), "", Vec::new())
            .await
    }

    /// Stores WAL file `file` (a whole segment, or a history file) in clone `clone`'s
    /// `pg_wal/`.
    pub async fn put_clone_wal(
        &self,
        clone: &CloneName,
        file: &WalFileName,
        bytes: Vec<u8>,
    ) -> Result<(), AgentError> {
        self.empty(
            Method::PUT,
            &format!("/v1/clones/{clone}/wal/{file}"),
            "",
            bytes,
        )
        .await
    }

    /// Stores WAL file `file` (a whole segment, or a history file) in snapshot `name`'s
    /// `pg_wal/`.
    pub async fn put_snapshot_wal(
        &self,
        name: &SnapshotName,
        file: &WalFileName,
        bytes: Vec<u8>,
    ) -> Result<(), AgentError> {
        self.empty(
            Method::PUT,
            &format!("/v1/snapshots/{name}/wal/{file}"),
            "",
            bytes,
        )
        .await
    }

    /// Reflinks segments `first` to `last` (at most 64) from the live data directory's
    /// `pg_wal/` into snapshot `name`, so the snapshot holds its own WAL.
    pub async fn add_snapshot_wal(
        &self,
        name: &SnapshotName,
        first: &WalFileName,
        last: &WalFileName,
    ) -> Result<WalAdded, AgentError> {
        let body = serde_json::to_vec(&WalRangeRequest {
            first: first.clone(),
            last: last.clone(),
        })
        .map_err(|e| self.protocol(e.to_string()))?;
        self.json(Method::POST, &format!("/v1/snapshots/{name}/wal"), "", body)
            .await
    }

    /// Deletes clone `clone`, stopping its server first.
    pub async fn delete_clone(&self, clone: &CloneName) -> Result<(), AgentError> {
        self.empty(
            Method::DELETE,
            &format!("/v1/clones/{clone}"),
            "",
            Vec::new(),
        )
        .await
    }

    fn protocol(&self, reason: String) -> AgentError {
        AgentError::Protocol {
            url: self.url.clone(),
            reason,
        }
    }

    fn unreachable(&self, reason: String) -> AgentError {
        AgentError::Unreachable {
            url: self.url.clone(),
            reason,
        }
    }

    async fn json<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        query: &str,
        body: Vec<u8>,
    ) -> Result<T, AgentError> {
        let bytes = self
            .sealed(method, path, query, body, MAX_JSON_ANSWER)
            .await?;
        serde_json::from_slice(&bytes).map_err(|e| self.protocol(format!("bad JSON: {e}")))
    }

    async fn empty(
        &self,
        method: Method,
        path: &str,
        query: &str,
        body: Vec<u8>,
    ) -> Result<(), AgentError> {
        self.sealed(method, path, query, body, 64 * 1024).await?;
        Ok(())
    }

    /// Sends one signed request and reads its whole answer (at most `limit` bytes), whose
    /// MAC must verify; any status other than 2xx becomes an error.
    async fn sealed(
        &self,
        method: Method,
        path: &str,
        query: &str,
        body: Vec<u8>,
        limit: usize,
    ) -> Result<Bytes, AgentError> {
        let (response, seal) = self.send(method, path, query, body).await?;
        let status = response.status().as_u16();
        let claimed = mac_header(response.headers());
        let bytes = read_limited(response.into_body(), limit, self.timeouts.request)
            .await
            .map_err(|e| self.protocol(e))?;
        self.check_seal(seal, status, &bytes, claimed.as_deref())?;
        Ok(bytes)
    }

    fn check_seal(
        &self,
        mut seal: ResponseSeal,
        status: u16,
        body: &[u8],
        claimed: Option<&str>,
    ) -> Result<(), AgentError> {
        seal.update(body);
        seal.verify(status, claimed)
            .map_err(|e| AgentError::Forged {
                url: self.url.clone(),
                reason: e.0,
            })
    }

    /// The error a non-2xx answer stands for, once its MAC verified; with it, on a sealed
    /// 401, the earliest request time the agent accepts.
    async fn refusal(
        &self,
        response: hyper::Response<Incoming>,
        seal: ResponseSeal,
    ) -> (AgentError, Option<i64>) {
        let status = response.status();
        let claimed = mac_header(response.headers());
        let text = match read_limited(response.into_body(), 64 * 1024, self.timeouts.request).await
        {
            Ok(t) => t,
            Err(e) => return (self.protocol(e), None),
        };
        if let Err(forged) = self.check_seal(seal, status.as_u16(), &text, claimed.as_deref()) {
            // An agent holding another key seals its refusal with that key. Whoever sent it,
            // the request failed; its reason is shown but marked as unverified.
            if status == StatusCode::UNAUTHORIZED {
                let reason = format!(
                    "{} (unverified: the answer is not sealed with this key either, so the keys differ)",
                    error_message(&text).message
                );
                let url = self.url.clone();
                return (AgentError::Unauthorized { url, reason }, None);
            }
            return (forged, None);
        }
        let ErrorMessage {
            message,
            code,
            not_before,
        } = error_message(&text);
        let code = code.unwrap_or(if status == StatusCode::UNAUTHORIZED {
            ErrorCode::Unauthorized
        } else {
            ErrorCode::Internal
        });
        if status == StatusCode::UNAUTHORIZED || code == ErrorCode::Unauthorized {
            let url = self.url.clone();
            return (
                AgentError::Unauthorized {
                    url,
                    reason: message,
                },
                not_before,
            );
        }
        let refused = AgentError::Refused {
            url: self.url.clone(),
            status: status.as_u16(),
            code,
            message,
        };
        (refused, None)
    }

    /// Sends one signed request: its 2xx answer, and the seal its MAC is checked with. Refused
    /// as signed before the agent (re)started, which a client whose clock is a little behind
    /// the agent's meets right after a restart, it signs once more with the time the agent
    /// named.
    async fn send(
        &self,
        method: Method,
        path: &str,
        query: &str,
        body: Vec<u8>,
    ) -> Result<(hyper::Response<Incoming>, ResponseSeal), AgentError> {
        let body = Bytes::from(body);
        let timestamp = unix_now() + self.clock_offset;
        let (response, seal) = self
            .send_once(&method, path, query, body.clone(), timestamp)
            .await?;
        if response.status().is_success() {
            return Ok((response, seal));
        }
        let (refusal, not_before) = self.refusal(response, seal).await;
        let Some(not_before) =
            not_before.filter(|t| *t > timestamp && *t - unix_now() <= crate::auth::MAX_SKEW_SECS)
        else {
            return Err(refusal);
        };
        let (response, seal) = self
            .send_once(&method, path, query, body, not_before)
            .await?;
        if response.status().is_success() {
            return Ok((response, seal));
        }
        Err(self.refusal(response, seal).await.0)
    }

    /// Sends one request signed at `timestamp`, whatever its answer's status.
    async fn send_once(
        &self,
        method: &Method,
        path: &str,
        query: &str,
        body: Bytes,
        timestamp: i64,
    ) -> Result<(hyper::Response<Incoming>, ResponseSeal), AgentError> {
        let nonce = new_nonce();
        let signed = sign(
            &self.key,
            method.as_str(),
            path,
            query,
            &body,
            timestamp,
            &nonce,
        );
        let uri = if query.is_empty() {
            path.to_string()
        } else {
            format!("{path}?{query}")
        };
        let host_header = if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        };
        let mut builder = Request::builder()
            .method(method.clone())
            .uri(uri)
            .header(hyper::header::HOST, host_header)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            // A streamed answer's MAC comes as a trailer.
            .header(hyper::header::TE, "trailers");
        for (name, value) in signed.pairs() {
            builder = builder.header(name, value);
        }
        let request = builder
            .body(Full::new(body))
            .map_err(|e| self.protocol(e.to_string()))?;

        let mut sender = self.connect().await?;
        let response = tokio::time::timeout(self.timeouts.request, sender.send_request(request))
            .await
            .map_err(|_| self.unreachable(format!("no answer within {:?}", self.timeouts.request)))?
            .map_err(|e| self.unreachable(e.to_string()))?;
        Ok((response, ResponseSeal::new(&self.key, &nonce)))
    }

    async fn connect(
        &self,
    ) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>, AgentError> {
        let tcp = tokio::time::timeout(
            self.timeouts.connect,
            TcpStream::connect((self.host.as_str(), self.port)),
        )
        .await
        .map_err(|_| self.unreachable(format!("no connection within {:?}", self.timeouts.connect)))?
        .map_err(|e| self.unreachable(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            None => self.handshake(tcp).await,
            Some(connector) => {
                let name = rustls::pki_types::ServerName::try_from(self.host.clone())
                    .map_err(|e| self.protocol(format!("host name for TLS: {e}")))?;
                let stream =
                    tokio::time::timeout(self.timeouts.connect, connector.connect(name, tcp))
                        .await
                        .map_err(|_| self.unreachable("TLS handshake timed out".into()))?
                        .map_err(|e| AgentError::Tls {
                            url: self.url.clone(),
                            reason: e.to_string(),
                        })?;
                self.handshake(stream).await
            }
        }
    }

    async fn handshake<S>(
        &self,
        stream: S,
    ) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>, AgentError>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| self.unreachable(e.to_string()))?;
        let url = self.url.clone();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%url, "agent connection: {e}");
            }
        });
        Ok(sender)
    }
}

/// A file range being received; see [`AgentClient::read_range`].
#[derive(Debug)]
pub struct RangeReader {
    url: String,
    status: u16,
    body: Incoming,
    /// Until the trailer's MAC verified.
    seal: Option<ResponseSeal>,
    expected: u64,
    received: u64,
    /// The longest wait for the next bytes.
    idle: Duration,
}

impl RangeReader {
    /// Bytes the agent is sending in all.
    pub fn len(&self) -> u64 {
        self.expected
    }

    /// Whether the range is empty.
    pub fn is_empty(&self) -> bool {
        self.expected == 0
    }

    /// The next chunk, `None` at the end; an error if the stream broke off early, ran past
    /// the announced length, stalled for longer than the request timeout, or its MAC (in the
    /// trailer) is missing or wrong, so the bytes before must be discarded.
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>, AgentError> {
        loop {
            let frame = tokio::time::timeout(self.idle, self.body.frame())
                .await
                .map_err(|_| AgentError::Unreachable {
                    url: self.url.clone(),
                    reason: format!(
                        "file range stalled after {} of {} bytes (nothing for {:?})",
                        self.received, self.expected, self.idle
                    ),
                })?;
            match frame {
                None => {
                    if self.seal.is_some() {
                        return Err(AgentError::Forged {
                            url: self.url.clone(),
                            reason: format!(
                                "the file range ended without its {HEADER_RESPONSE_MAC} trailer"
                            ),
                        });
                    }
                    if self.received != self.expected {
                        return Err(AgentError::Protocol {
                            url: self.url.clone(),
                            reason: format!(
                                "file range ended after {} of {} bytes",
                                self.received, self.expected
                            ),
                        });
                    }
                    return Ok(None);
                }
                Some(Err(e)) => {
                    return Err(AgentError::Unreachable {
                        url: self.url.clone(),
                        reason: format!("file range broke off after {} bytes: {e}", self.received),
                    })
                }
                Some(Ok(frame)) => {
                    let frame = match frame.into_data() {
                        Ok(data) => {
                            let Some(seal) = self.seal.as_mut() else {
                                return Err(AgentError::Protocol {
                                    url: self.url.clone(),
                                    reason: "file range data after its trailer".into(),
                                });
                            };
                            if self.received + data.len() as u64 > self.expected {
                                return Err(AgentError::Protocol {
                                    url: self.url.clone(),
                                    reason: format!(
                                        "file range ran past its announced {} bytes",
                                        self.expected
                                    ),
                                });
                            }
                            seal.update(&data);
                            self.received += data.len() as u64;
                            return Ok(Some(data));
                        }
                        Err(frame) => frame,
                    };
                    if let (Ok(trailers), Some(seal)) = (frame.into_trailers(), self.seal.take()) {
                        seal.verify(self.status, mac_header(&trailers).as_deref())
                            .map_err(|e| AgentError::Forged {
                                url: self.url.clone(),
                                reason: e.0,
                            })?;
                    }
                }
            }
        }
    }
}

/// What an error answer says.
struct ErrorMessage {
    /// One line.
    message: String,
    /// Its kind, when it is an [`ErrorBody`].
    code: Option<ErrorCode>,
    /// The earliest request time the agent accepts, on a 401.
    not_before: Option<i64>,
}

fn error_message(text: &[u8]) -> ErrorMessage {
    match serde_json::from_slice::<ErrorBody>(text) {
        Ok(b) => ErrorMessage {
            message: b.message,
            code: Some(b.code),
            not_before: b.not_before,
        },
        Err(_) => {
            let text = String::from_utf8_lossy(text);
            let line = text.lines().next().unwrap_or("").trim();
            ErrorMessage {
                message: line.chars().take(300).collect(),
                code: None,
                not_before: None,
            }
        }
    }
}

/// The `x-strata-response-mac` of an answer's headers or trailers.
fn mac_header(headers: &hyper::HeaderMap) -> Option<String> {
    headers
        .get(HEADER_RESPONSE_MAC)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// An answer's body, refused past `limit` bytes or when nothing arrives for `idle`.
async fn read_limited(mut body: Incoming, limit: usize, idle: Duration) -> Result<Bytes, String> {
    let mut out = BytesMut::new();
    loop {
        let Some(frame) = tokio::time::timeout(idle, body.frame())
            .await
            .map_err(|_| {
                format!(
                    "the answer stalled after {} bytes (nothing for {idle:?})",
                    out.len()
                )
            })?
        else {
            break;
        };
        let frame = frame.map_err(|e| format!("reading the answer: {e}"))?;
        if let Ok(data) = frame.into_data() {
            if out.len() + data.len() > limit {
                return Err(format!("answer larger than {limit} bytes"));
            }
            out.extend_from_slice(&data);
        }
    }
    Ok(out.freeze())
}

/// Largest CA file read.
const MAX_CA_FILE: u64 = 4 << 20;

/// The bytes of `path`, a regular file (a FIFO or device in its place is refused without
/// blocking) of at most [`MAX_CA_FILE`] bytes.
fn read_ca_file(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let refuse = |why: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, why);
    if !file.metadata()?.is_file() {
        return Err(refuse("not a regular file".into()));
    }
    let mut out = Vec::new();
    file.take(MAX_CA_FILE + 1).read_to_end(&mut out)?;
    if out.len() as u64 > MAX_CA_FILE {
        return Err(refuse(format!("larger than {MAX_CA_FILE} bytes")));
    }
    Ok(out)
}

/// A TLS connector trusting the certificates in `ca_file` (a CA or the agent's own).
fn tls_connector(ca_file: &Path) -> Result<tokio_rustls::TlsConnector, String> {
    let pem = read_ca_file(ca_file).map_err(|e| format!("{}: {e}", ca_file.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut &pem[..]) {
        let cert = cert.map_err(|e| format!("{}: {e}", ca_file.display()))?;
        roots
            .add(cert)
            .map_err(|e| format!("{}: {e}", ca_file.display()))?;
    }
    if roots.is_empty() {
        return Err(format!("{}: no PEM certificate found", ca_file.display()));
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}
