//! Downloads through expiring signed links. A link is a path plus
//! `Expires` (Unix seconds) and `Signature` = hex HMAC-SHA256 over
//! `GET\n<path>\n<expires>` with a key only the server knows (never an
//! AccessKey secret). Expired or altered links get 403.
//!
//! - `/download/backups/<instance>/<backup>.tar[.zst]`: the backup set in
//!   pg_basebackup's tar layout (see `strata_engine::BackupArchive`).
//! - `/download/wal/<instance>/<segment>`: one WAL segment, its original
//!   bytes.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Duration, Utc};
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use tokio::sync::mpsc;

use crate::error::ApiError;
use crate::ApiState;

/// Makes and checks download links.
pub struct LinkSigner {
    key: [u8; 32],
    /// `scheme://host:port` the links start with.
    pub base_url: String,
    /// How long a link stays valid.
    pub lifetime: Duration,
}

impl LinkSigner {
    /// A signer with `key` (for a fleet: the key shared through the
    /// catalog, so every node accepts links any node signed).
    pub fn new(key: [u8; 32], base_url: String, lifetime: Duration) -> Self {
        LinkSigner {
            key,
            base_url: base_url.trim_end_matches('/').to_string(),
            lifetime,
        }
    }

    /// The key in `path`, if a file holds one (what an earlier release
    /// signed links with).
    pub fn read_key_file(path: &Path) -> std::io::Result<Option<[u8; 32]>> {
        match std::fs::read(path) {
            Ok(bytes) => bytes.try_into().map(Some).map_err(|_| {
                std::io::Error::other(format!("{} is not a 32-byte link key", path.display()))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn mac(&self, path: &str, expires: i64) -> Hmac<Sha256> {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes keys of any length");
        mac.update(format!("GET\n{path}\n{expires}").as_bytes());
        mac
    }

    /// A link to `path` valid from `now` for the configured lifetime.
    pub fn sign(&self, path: &str, now: DateTime<Utc>) -> (String, DateTime<Utc>) {
        let expires = now + self.lifetime;
        let sig = hex::encode(self.mac(path, expires.timestamp()).finalize().into_bytes());
        (
            format!(
                "{}{path}?Expires={}&Signature={sig}",
                self.base_url,
                expires.timestamp()
            ),
            expires,
        )
    }

    fn check(&self, path: &str, q: &LinkQuery, now: DateTime<Utc>) -> Result<(), ApiError> {
        let forbidden = |m: &str| ApiError::new(StatusCode::FORBIDDEN, "Forbidden.DownloadLink", m);
        let (Some(expires), Some(sig)) = (q.expires, q.signature.as_deref()) else {
            return Err(forbidden("The download link lacks Expires or Signature."));
        };
        let sig = hex::decode(sig)
            .map_err(|_| forbidden("The download link's signature is malformed."))?;
        self.mac(path, expires).verify_slice(&sig).map_err(|_| {
            forbidden("The download link's signature does not match (altered link?).")
        })?;
        if expires < now.timestamp() {
            return Err(forbidden(
                "The download link has expired; list the backups again for a fresh one.",
            ));
        }
        Ok(())
    }
}

#[derive(serde::Deserialize)]
pub struct LinkQuery {
    #[serde(rename = "Expires")]
    expires: Option<i64>,
    #[serde(rename = "Signature")]
    signature: Option<String>,
}

fn error(e: ApiError) -> Response {
    (
        e.status,
        [(header::CONTENT_TYPE, "application/json;charset=utf-8")],
        serde_json::json!({"Code": e.code, "Message": e.message}).to_string(),
    )
        .into_response()
}

/// Buffers writes and hands them to the HTTP body; a client that goes away
/// makes the next write fail, which stops the producer.
struct ChannelWriter {
    tx: mpsc::Sender<Result<Bytes, std::io::Error>>,
    buf: Vec<u8>,
    /// The runtime the body is read on, to wait for the reader with a time limit.
    runtime: tokio::runtime::Handle,
    /// How long to wait for the reader to take a chunk.
    stalled: std::time::Duration,
}

const CHUNK: usize = 256 * 1024;

/// How long a download waits for its client to take the next chunk before it gives up.
const STALLED_READER: std::time::Duration = std::time::Duration::from_secs(300);

/// How long a WAL download waits for a place (see [`WAL_DOWNLOADS`]) before it is refused.
const WAL_PLACE_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// WAL downloads whose segment is held in memory at once (each up to the instance's segment
/// size); more wait for one to finish. A download holds its place until its last byte is
/// handed to the connection, so many parallel requests for one link cannot add up segments.
static WAL_DOWNLOADS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(8);

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK {
            self.flush()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK)));
        // A client that stops reading but keeps its connection open would hold what this
        // download holds (a WAL download's place, the repository's shared lock) forever.
        let sent = self
            .runtime
            .block_on(tokio::time::timeout(self.stalled, self.tx.send(Ok(chunk))));
        match sent {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "the client went away",
            )),
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the client read nothing for {:?}", self.stalled),
            )),
        }
    }
}

fn stream_body(
    produce: impl FnOnce(&mut ChannelWriter) -> Result<(), String> + Send + 'static,
) -> Body {
    stream_body_within(STALLED_READER, produce)
}

/// [`stream_body`], giving up on a client that takes no chunk for `stalled`.
fn stream_body_within(
    stalled: std::time::Duration,
    produce: impl FnOnce(&mut ChannelWriter) -> Result<(), String> + Send + 'static,
) -> Body {
    let (tx, rx) = mpsc::channel(4);
    let runtime = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        let mut w = ChannelWriter {
            tx: tx.clone(),
            buf: Vec::with_capacity(CHUNK),
            runtime,
            stalled,
        };
        let outcome = produce(&mut w).and_then(|()| w.flush().map_err(|e| e.to_string()));
        if let Err(e) = outcome {
            tracing::warn!("download stopped: {e}");
            // Ends the body with an error: the client sees a broken transfer,
            // never a silently truncated archive.
            let _ = w.runtime.block_on(tokio::time::timeout(
                w.stalled,
                tx.send(Err(std::io::Error::other(e))),
            ));
        }
    });
    Body::from_stream(futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    }))
}

pub async fn backup(
    State(state): State<Arc<ApiState>>,
    UrlPath((instance, file)): UrlPath<(String, String)>,
    Query(q): Query<LinkQuery>,
) -> Response {
    let path = format!("/download/backups/{instance}/{file}");
    if let Err(e) = state.links.check(&path, &q, Utc::now()) {
        return error(e);
    }
    let (backup_id, zstd) = match (file.strip_suffix(".tar.zst"), file.strip_suffix(".tar")) {
        (Some(b), _) => (b.to_string(), true),
        (None, Some(b)) => (b.to_string(), false),
        _ => {
            return error(ApiError::new(
                StatusCode::NOT_FOUND,
                "InvalidBackupSetID.NotFound",
                "Unknown download.",
            ))
        }
    };
    let service = state.service.clone();
    let planned = tokio::task::spawn_blocking(move || {
        let archive = service.backup_archive(&instance, &backup_id)?;
        let size = if zstd { None } else { Some(archive.size()?) };
        Ok::<_, strata_service::ServiceError>((archive, size))
    })
    .await;
    let (archive, size) = match planned {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => return error(e.into()),
        Err(e) => {
            return error(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalError",
                e.to_string(),
            ))
        }
    };
    let body = stream_body(move |w| {
        archive
            .write(w, zstd.then_some(3))
            .map_err(|e| e.to_string())
    });
    let mut resp = Response::new(body);
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        "application/x-tar".parse().expect("valid header"),
    );
    if let Ok(v) = format!("attachment; filename=\"{file}\"").parse() {
        headers.insert(header::CONTENT_DISPOSITION, v);
    }
    if let Some(n) = size {
        headers.insert(header::CONTENT_LENGTH, n.into());
    }
    resp
}

pub async fn wal(
    State(state): State<Arc<ApiState>>,
    UrlPath((instance, file)): UrlPath<(String, String)>,
    Query(q): Query<LinkQuery>,
) -> Response {
    let path = format!("/download/wal/{instance}/{file}");
    if let Err(e) = state.links.check(&path, &q, Utc::now()) {
        return error(e);
    }
    let Ok(Ok(place)) = tokio::time::timeout(WAL_PLACE_WAIT, WAL_DOWNLOADS.acquire()).await else {
        let mut resp = error(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailable",
            "too many WAL downloads at once; try again shortly",
        ));
        resp.headers_mut()
            .insert(header::RETRY_AFTER, "5".parse().expect("valid header"));
        return resp;
    };
    let service = state.service.clone();
    let read = tokio::task::spawn_blocking(move || -> Result<Vec<u8>, ApiError> {
        let (name, partial) = match file.strip_suffix(".partial") {
            Some(n) => (n.to_string(), true),
            None => (file.clone(), false),
        };
        service.wal_file(&instance, &name, partial)?.ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "InvalidLogFile.NotFound",
                format!("no WAL segment {file} for {instance}"),
            )
        })
    })
    .await;
    match read {
        Ok(Ok(data)) => {
            let len = data.len();
            let body = stream_body(move |w| {
                let _place = place;
                w.write_all(&data).map_err(|e| e.to_string())
            });
            let mut resp = Response::new(body);
            let headers = resp.headers_mut();
            headers.insert(
                header::CONTENT_TYPE,
                "application/octet-stream".parse().expect("valid header"),
            );
            headers.insert(header::CONTENT_LENGTH, len.into());
            resp
        }
        Ok(Err(e)) => error(e),
        Err(e) => error(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            e.to_string(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client that stops reading ends the download after the wait (whatever it held is let
    /// go); one that reads gets every byte.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_download_whose_client_stops_reading_gives_up() {
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let produce = move |w: &mut ChannelWriter| {
            let outcome = (0..20).try_for_each(|_| w.write_all(&[7u8; CHUNK]));
            let _ = done_tx.send(outcome.as_ref().map_err(|e| e.kind()).copied());
            outcome.map_err(|e| e.to_string())
        };
        let body = stream_body_within(std::time::Duration::from_millis(200), produce);
        let outcome = tokio::task::spawn_blocking(move || {
            done_rx.recv_timeout(std::time::Duration::from_secs(20))
        })
        .await
        .unwrap()
        .expect("the writer gave up");
        assert_eq!(outcome, Err(std::io::ErrorKind::TimedOut));
        drop(body);

        let body = stream_body_within(std::time::Duration::from_millis(200), |w| {
            (0..20)
                .try_for_each(|_| w.write_all(&[7u8; CHUNK]))
                .map_err(|e| e.to_string())
        });
        let bytes = axum::body::to_bytes(body, usize::MAX).await.unwrap();
        assert_eq!(bytes.len(), 20 * CHUNK);
    }

    fn signer(key: [u8; 32]) -> LinkSigner {
        LinkSigner::new(key, "http://h:1/".into(), Duration::seconds(60))
    }

    fn query(url: &str) -> LinkQuery {
        let q = url.split_once('?').unwrap().1;
        let get = |k: &str| {
            q.split('&')
                .find_map(|p| p.strip_prefix(&format!("{k}=")))
                .map(str::to_string)
        };
        LinkQuery {
            expires: get("Expires").map(|v| v.parse().unwrap()),
            signature: get("Signature"),
        }
    }

    #[test]
    fn links_expire_and_cannot_be_moved_or_forged() {
        let key: [u8; 32] = rand::random();
        let s = signer(key);
        let now = Utc::now();
        let (url, expires) = s.sign("/download/wal/i/seg", now);
        assert!(url.starts_with("http://h:1/download/wal/i/seg?Expires="));
        assert_eq!(expires, now + Duration::seconds(60));
        let q = query(&url);
        s.check("/download/wal/i/seg", &q, now).unwrap();
        s.check("/download/wal/i/seg", &q, now + Duration::seconds(59))
            .unwrap();
        let late = s
            .check("/download/wal/i/seg", &q, now + Duration::seconds(61))
            .unwrap_err();
        assert_eq!(late.status, StatusCode::FORBIDDEN);
        assert!(late.message.contains("expired"), "{}", late.message);
        let moved = s.check("/download/wal/i/other", &q, now).unwrap_err();
        assert!(moved.message.contains("does not match"));
        let stretched = LinkQuery {
            expires: q.expires.map(|e| e + 3600),
            signature: q.signature.clone(),
        };
        assert!(s.check("/download/wal/i/seg", &stretched, now).is_err());
        assert!(s
            .check(
                "/download/wal/i/seg",
                &LinkQuery {
                    expires: None,
                    signature: None
                },
                now
            )
            .is_err());
        // A signer with the same key (another node) accepts the link;
        // another key does not.
        signer(key).check("/download/wal/i/seg", &q, now).unwrap();
        assert!(signer(rand::random())
            .check("/download/wal/i/seg", &q, now)
            .is_err());
    }

    #[test]
    fn an_old_key_file_is_read_and_a_wrong_one_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("link-key");
        assert_eq!(LinkSigner::read_key_file(&path).unwrap(), None);
        std::fs::write(&path, [7u8; 32]).unwrap();
        assert_eq!(LinkSigner::read_key_file(&path).unwrap(), Some([7u8; 32]));
        std::fs::write(&path, [7u8; 31]).unwrap();
        assert!(LinkSigner::read_key_file(&path).is_err());
    }
}
