//! A repository in an S3-compatible object store (AWS S3, MinIO, Ceph RGW,
//! s3s-fs, …), through the `object_store` crate's Amazon S3 client: request
//! signing (SigV4), credentials and the wire protocol are its job, not ours.
//!
//! The [`Storage`] trait is synchronous and is called from plain threads and
//! from inside tokio tasks alike, so this backend owns a small tokio runtime of
//! its own: each call is spawned onto it and the caller waits on a blocking
//! channel. (`Runtime::block_on` would panic when the caller is itself a
//! runtime thread.)
//!
//! Atomicity: an object becomes visible only when a single PUT or a
//! CompleteMultipartUpload succeeds (Amazon S3 User Guide, "Uploading and
//! copying objects using multipart upload"), so a reader never sees a partial
//! object. Objects larger than `multipart_threshold` go up in `part_size`
//! parts, several at once; an upload that fails is aborted so its parts do
//! not linger. At most `max_concurrency` requests are in flight per store;
//! a backup keeps `upload_concurrency` packs in flight, each one PUT.
//!
//! `object_store`'s own retry loop is switched off: retries are decided in
//! one place, by [`StorageError::is_transient`] in [`super::RetryingStorage`].

use std::error::Error as StdError;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::aws::AmazonS3Builder;
use object_store::client::HttpError;
use object_store::path::Path;
use object_store::prefix::PrefixStore;
use object_store::{ClientOptions, ObjectStore, PutPayload, RetryConfig};
use tokio::sync::Semaphore;

use super::{list_dir, validate_key, ObjectSize, Storage, StorageError, StorageResult};

/// The smallest part S3 accepts in a multipart upload (all but the last).
pub const MIN_PART_SIZE: usize = 5 * 1024 * 1024;

/// Objects above this go up as multipart uploads by default. Packs (about
/// 17 MB) and WAL segments stay below: they go up in parallel with each
/// other, and one PUT is one request where a multipart upload is at least
/// three (and a server that assembles the parts writes every byte twice).
pub const DEFAULT_MULTIPART_THRESHOLD: usize = 64 * 1024 * 1024;

/// Packs stored at once by default: enough to keep a loopback or LAN
/// service busy while the backup compresses the next ones.
pub const DEFAULT_UPLOAD_CONCURRENCY: usize = 4;

/// The most packs a backup may store at once (each holds ~17 MB).
pub const MAX_UPLOAD_CONCURRENCY: usize = 16;

/// Where and how to reach the bucket.
#[derive(Clone, PartialEq, Eq)]
pub struct S3Config {
    /// Bucket name.
    pub bucket: String,
    /// Key prefix inside the bucket (no leading or trailing `/`; may be empty).
    pub prefix: String,
    /// Service URL, e.g. `http://127.0.0.1:9000`; `None` = AWS for `region`.
    pub endpoint: Option<String>,
    /// Region used to sign requests (SigV4).
    pub region: String,
    /// Static credentials; when absent, the `AWS_*` environment and the
    /// instance's credentials are used, as the AWS SDKs do.
    pub access_key_id: Option<String>,
    /// Secret of `access_key_id`.
    pub secret_access_key: Option<String>,
    /// Session token of temporary credentials.
    pub session_token: Option<String>,
    /// `http://endpoint/bucket/key` instead of `http://bucket.endpoint/key`.
    pub path_style: bool,
    /// Permit `http://` endpoints (tests, private networks).
    pub allow_http: bool,
    /// Objects larger than this go up as multipart uploads.
    pub multipart_threshold: usize,
    /// Size of each part of a multipart upload.
    pub part_size: usize,
    /// Requests in flight at once.
    pub max_concurrency: usize,
    /// Packs a backup stores at once (see [`Storage::concurrent_puts`]);
    /// each holds a pack buffer (about 17 MB) until it is stored.
    pub upload_concurrency: usize,
    /// Deadline of one HTTP request.
    pub request_timeout: Duration,
    /// Deadline of establishing a connection.
    pub connect_timeout: Duration,
}

impl std::fmt::Debug for S3Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Config")
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field("path_style", &self.path_style)
            .field("allow_http", &self.allow_http)
            .field("multipart_threshold", &self.multipart_threshold)
            .field("part_size", &self.part_size)
            .field("max_concurrency", &self.max_concurrency)
            .field("upload_concurrency", &self.upload_concurrency)
            .field("request_timeout", &self.request_timeout)
            .finish_non_exhaustive()
    }
}

impl S3Config {
    /// Parses `s3://bucket[/prefix]`; every other setting takes its default.
    pub fn from_url(url: &str) -> StorageResult<Self> {
        let rest = url.strip_prefix("s3://").ok_or_else(|| {
            StorageError::Config(format!("{url:?} is not an s3://bucket/prefix URL"))
        })?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let valid_bucket = (3..=63).contains(&bucket.len())
            && bucket
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.');
        if !valid_bucket {
            return Err(StorageError::Config(format!(
                "{bucket:?} is not a valid bucket name (3-63 lower-case letters, digits, '-' or '.')"
            )));
        }
        let prefix = prefix.trim_matches('/').to_string();
        if !prefix.is_empty() {
            validate_key(&prefix)
                .map_err(|_| StorageError::Config(format!("invalid key prefix {prefix:?}")))?;
        }
        Ok(S3Config {
            bucket: bucket.to_string(),
            prefix,
            endpoint: None,
            region: "us-east-1".into(),
            access_key_id: None,
            secret_access_key: None,
            session_token: None,
            path_style: false,
            allow_http: false,
            multipart_threshold: DEFAULT_MULTIPART_THRESHOLD,
            part_size: 8 * 1024 * 1024,
            max_concurrency: 8,
            upload_concurrency: DEFAULT_UPLOAD_CONCURRENCY,
            request_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(5),
        })
    }

    fn url(&self) -> String {
        if self.prefix.is_empty() {
            format!("s3://{}", self.bucket)
        } else {
            format!("s3://{}/{}", self.bucket, self.prefix)
        }
    }
}

/// A repository in an S3 bucket (under a key prefix).
pub struct S3Storage {
    store: Arc<dyn ObjectStore>,
    handle: tokio::runtime::Handle,
    /// Kept only to be shut down on drop (without blocking: the last
    /// reference may be dropped inside another runtime).
    runtime: Option<tokio::runtime::Runtime>,
    permits: Arc<Semaphore>,
    config: S3Config,
}

impl std::fmt::Debug for S3Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Storage")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Drop for S3Storage {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl S3Storage {
    /// Sets up the client; no request is made until the first call.
    pub fn new(config: S3Config) -> StorageResult<Self> {
        if config.part_size < MIN_PART_SIZE {
            return Err(StorageError::Config(format!(
                "part size {} is below S3's minimum of {MIN_PART_SIZE} bytes",
                config.part_size
            )));
        }
        if config.multipart_threshold < config.part_size {
            return Err(StorageError::Config(format!(
                "multipart threshold {} is below the part size {}",
                config.multipart_threshold, config.part_size
            )));
        }
        if config.max_concurrency == 0 {
            return Err(StorageError::Config(
                "max_concurrency must be at least 1".into(),
            ));
        }
        if !(1..=MAX_UPLOAD_CONCURRENCY).contains(&config.upload_concurrency) {
            return Err(StorageError::Config(format!(
                "upload_concurrency must be between 1 and {MAX_UPLOAD_CONCURRENCY}, got {}",
                config.upload_concurrency
            )));
        }
        let mut builder = AmazonS3Builder::from_env()
            .with_bucket_name(&config.bucket)
            .with_region(&config.region)
            .with_virtual_hosted_style_request(!config.path_style)
            .with_allow_http(config.allow_http)
            .with_retry(RetryConfig {
                max_retries: 0,
                ..RetryConfig::default()
            })
            .with_client_options(
                ClientOptions::new()
                    .with_allow_http(config.allow_http)
                    .with_timeout(config.request_timeout)
                    .with_connect_timeout(config.connect_timeout),
            );
        if let Some(endpoint) = &config.endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        if let Some(id) = &config.access_key_id {
            builder = builder.with_access_key_id(id);
        }
        if let Some(secret) = &config.secret_access_key {
            builder = builder.with_secret_access_key(secret);
        }
        if let Some(token) = &config.session_token {
            builder = builder.with_token(token);
        }
        let s3 = builder
            .build()
            .map_err(|e| StorageError::Config(format!("{}: {e}", config.url())))?;
        let store: Arc<dyn ObjectStore> = if config.prefix.is_empty() {
            Arc::new(s3)
        } else {
            Arc::new(PrefixStore::new(s3, config.prefix.as_str()))
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("strata-s3")
            .enable_all()
            .build()
            .map_err(|e| {
                StorageError::Config(format!("cannot start the S3 client runtime: {e}"))
            })?;
        Ok(S3Storage {
            store,
            handle: runtime.handle().clone(),
            runtime: Some(runtime),
            permits: Arc::new(Semaphore::new(config.max_concurrency)),
            config,
        })
    }

    /// The configuration the store was made with.
    pub fn config(&self) -> &S3Config {
        &self.config
    }

    /// Runs `work` on this store's runtime and waits for it from any thread.
    fn call<T, F>(&self, op: &'static str, key: &str, work: F) -> StorageResult<T>
    where
        T: Send + 'static,
        F: Future<Output = StorageResult<T>> + Send + 'static,
    {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let started = std::time::Instant::now();
        self.handle.spawn(async move {
            let _ = tx.send(work.await);
        });
        let answer = rx.recv();
        tracing::debug!("s3 {op} {key}: {} ms", started.elapsed().as_millis());
        answer.unwrap_or_else(|_| {
            Err(StorageError::Remote {
                op,
                key: key.to_string(),
                message: "the S3 client runtime stopped".into(),
                transient: false,
            })
        })
    }

    fn request_context(&self, op: &'static str, key: &str) -> Request {
        Request {
            op,
            key: key.to_string(),
            store: self.store.clone(),
            permits: self.permits.clone(),
        }
    }
}

/// What every request future owns: the store, its name and the permits.
struct Request {
    op: &'static str,
    key: String,
    store: Arc<dyn ObjectStore>,
    permits: Arc<Semaphore>,
}

impl Request {
    fn path(&self) -> StorageResult<Path> {
        Path::parse(&self.key).map_err(|_| StorageError::InvalidKey(self.key.clone()))
    }

    fn fail(&self, err: object_store::Error) -> StorageError {
        classify(self.op, &self.key, err)
    }

    async fn permit(&self) -> StorageResult<tokio::sync::SemaphorePermit<'_>> {
        self.permits
            .acquire()
            .await
            .map_err(|_| StorageError::Remote {
                op: self.op,
                key: self.key.clone(),
                message: "the S3 client is shutting down".into(),
                transient: false,
            })
    }

    /// One PUT, or a multipart upload that is aborted if any step fails.
    async fn put(
        self,
        data: Bytes,
        threshold: usize,
        part_size: usize,
        parallel: usize,
    ) -> StorageResult<()> {
        let path = self.path()?;
        if data.len() <= threshold {
            let _permit = self.permit().await?;
            self.store
                .put(&path, PutPayload::from(data))
                .await
                .map_err(|e| self.fail(e))?;
            return Ok(());
        }
        let mut upload = {
            let _permit = self.permit().await?;
            self.store
                .put_multipart(&path)
                .await
                .map_err(|e| self.fail(e))?
        };
        let mut parts: Vec<futures::future::BoxFuture<'_, StorageResult<()>>> = Vec::new();
        for start in (0..data.len()).step_by(part_size) {
            let end = (start + part_size).min(data.len());
            let part = upload.put_part(PutPayload::from(data.slice(start..end)));
            parts.push(Box::pin(self.upload_part(part)));
        }
        let uploaded = futures::stream::iter(parts)
            .buffer_unordered(parallel)
            .try_collect::<Vec<()>>()
            .await;
        let completed = match uploaded {
            Ok(_) => {
                let _permit = self.permit().await?;
                upload
                    .complete()
                    .await
                    .map(|_| ())
                    .map_err(|e| self.fail(e))
            }
            Err(e) => Err(e),
        };
        if completed.is_err() {
            // Parts of an unfinished upload are invisible but billed; drop them.
            if let Err(e) = upload.abort().await {
                tracing::warn!("aborting the multipart upload of {}: {e}", self.key);
            }
        }
        completed
    }

    async fn upload_part(&self, part: object_store::UploadPart) -> StorageResult<()> {
        let _permit = self.permit().await?;
        part.await.map_err(|e| self.fail(e))
    }

    async fn get(self) -> StorageResult<Vec<u8>> {
        let path = self.path()?;
        let _permit = self.permit().await?;
        let result = self.store.get(&path).await.map_err(|e| self.fail(e))?;
        let bytes = result.bytes().await.map_err(|e| self.fail(e))?;
        Ok(bytes.to_vec())
    }

    async fn get_range(self, offset: u64, len: u64) -> StorageResult<Vec<u8>> {
        let path = self.path()?;
        let short = || StorageError::ShortRead {
            key: self.key.clone(),
            offset,
            len,
        };
        if len == 0 {
            // An empty HTTP range is not expressible; only check the object is long enough.
            let _permit = self.permit().await?;
            let meta = self.store.head(&path).await.map_err(|e| self.fail(e))?;
            return if meta.size >= offset {
                Ok(Vec::new())
            } else {
                Err(short())
            };
        }
        let end = offset.checked_add(len).ok_or_else(short)?;
        let _permit = self.permit().await?;
        match self.store.get_range(&path, offset..end).await {
            Ok(bytes) if bytes.len() as u64 == len => Ok(bytes.to_vec()),
            Ok(_) => Err(short()),
            Err(e) => match self.fail(e) {
                // 416: the range starts past the end.
                StorageError::Remote { message, .. } if message.contains("416") => Err(short()),
                StorageError::Remote { message, .. } if message.contains("Wanted range") => {
                    Err(short())
                }
                other => Err(other),
            },
        }
    }

    async fn list(self, dir: Option<String>) -> StorageResult<Vec<ObjectSize>> {
        let prefix = dir
            .map(|d| Path::parse(&d).map_err(|_| StorageError::InvalidKey(d)))
            .transpose()?;
        let _permit = self.permit().await?;
        let objects: Vec<_> = self
            .store
            .list(prefix.as_ref())
            .try_collect()
            .await
            .map_err(|e| self.fail(e))?;
        let mut listed: Vec<ObjectSize> = objects
            .into_iter()
            .map(|meta| ObjectSize {
                key: meta.location.to_string(),
                size: meta.size,
            })
            .collect();
        listed.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(listed)
    }

    async fn delete(self) -> StorageResult<()> {
        let path = self.path()?;
        let _permit = self.permit().await?;
        match self.store.delete(&path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.fail(e)),
        }
    }

    async fn exists(self) -> StorageResult<bool> {
        let path = self.path()?;
        let _permit = self.permit().await?;
        match self.store.head(&path).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.fail(e)),
        }
    }
}

impl Storage for S3Storage {
    fn put(&self, key: &str, data: &[u8]) -> StorageResult<()> {
        // The request runs on this store's runtime and must own its bytes.
        self.put_bytes(key, Bytes::copy_from_slice(data))
    }

    fn put_bytes(&self, key: &str, data: Bytes) -> StorageResult<()> {
        validate_key(key)?;
        let request = self.request_context("put", key);
        let c = &self.config;
        let upload = request.put(data, c.multipart_threshold, c.part_size, c.max_concurrency);
        self.call("put", key, upload)
    }

    fn concurrent_puts(&self) -> usize {
        self.config.upload_concurrency
    }

    fn get(&self, key: &str) -> StorageResult<Vec<u8>> {
        validate_key(key)?;
        self.call("get", key, self.request_context("get", key).get())
    }

    fn get_range(&self, key: &str, offset: u64, len: u64) -> StorageResult<Vec<u8>> {
        validate_key(key)?;
        let request = self.request_context("get_range", key);
        self.call("get_range", key, request.get_range(offset, len))
    }

    fn list(&self, prefix: &str) -> StorageResult<Vec<String>> {
        Ok(self
            .list_sizes(prefix)?
            .into_iter()
            .map(|o| o.key)
            .collect())
    }

    fn list_sizes(&self, prefix: &str) -> StorageResult<Vec<ObjectSize>> {
        let dir = list_dir(prefix)?.map(str::to_string);
        let request = self.request_context("list", prefix);
        self.call("list", prefix, request.list(dir))
    }

    fn delete(&self, key: &str) -> StorageResult<()> {
        validate_key(key)?;
        self.call("delete", key, self.request_context("delete", key).delete())
    }

    fn exists(&self, key: &str) -> StorageResult<bool> {
        validate_key(key)?;
        self.call("exists", key, self.request_context("exists", key).exists())
    }

    fn describe(&self) -> String {
        match &self.config.endpoint {
            Some(endpoint) => format!("{} at {endpoint}", self.config.url()),
            None => self.config.url(),
        }
    }
}

/// Turns an `object_store` error into ours and decides whether it is
/// transient: transport failures (connect, reset, timeout, a body cut short)
/// and HTTP 5xx, 429 and 408 are; other answers from the service are not.
fn classify(op: &'static str, key: &str, err: object_store::Error) -> StorageError {
    use object_store::Error as E;
    let message = error_chain(&err);
    let transient = match &err {
        E::NotFound { .. } => return StorageError::NotFound(key.to_string()),
        E::Generic { source, .. } => generic_is_transient(source.as_ref(), &message),
        // Refusals (403, 401, 409, 412, 304), bad paths, unsupported calls.
        _ => false,
    };
    StorageError::Remote {
        op,
        key: key.to_string(),
        message,
        transient,
    }
}

fn generic_is_transient(source: &(dyn StdError + Send + Sync + 'static), message: &str) -> bool {
    let mut cause: Option<&(dyn StdError + 'static)> = Some(source);
    while let Some(e) = cause {
        if e.downcast_ref::<HttpError>().is_some() {
            return true;
        }
        cause = e.source();
    }
    match http_status(message) {
        Some(status) => status >= 500 || status == 429 || status == 408,
        // An unparseable or error-bearing 200 answer (S3 reports some
        // CompleteMultipartUpload failures that way): worth another try.
        None => true,
    }
}

/// The HTTP status `object_store` reports in its message
/// ("… status code: 503 Service Unavailable …"); it exposes no typed accessor.
fn http_status(message: &str) -> Option<u16> {
    let at = message.find("status code: ")? + "status code: ".len();
    message.get(at..at + 3)?.parse().ok()
}

fn error_chain(err: &dyn StdError) -> String {
    let mut text = err.to_string();
    let mut cause = err.source();
    while let Some(e) = cause {
        let part = e.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        cause = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::TcpListener;

    use super::*;

    /// A server that answers every request with `status` and counts them.
    fn canned_server(status: &'static str) -> (String, Arc<std::sync::atomic::AtomicU32>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let count = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let seen = count.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let mut buf = [0u8; 65536];
                let _ = stream.read(&mut buf);
                let body = "<Error><Code>X</Code></Error>";
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        (format!("http://{addr}"), count)
    }

    fn storage(endpoint: String) -> S3Storage {
        let mut config = S3Config::from_url("s3://bucket/pre/fix").unwrap();
        config.endpoint = Some(endpoint);
        config.access_key_id = Some("AKID".into());
        config.secret_access_key = Some("SECRET".into());
        config.path_style = true;
        config.allow_http = true;
        S3Storage::new(config).unwrap()
    }

    #[test]
    fn server_errors_are_transient_and_not_retried_inside_the_client() {
        let (endpoint, count) = canned_server("503 Service Unavailable");
        let s = storage(endpoint);
        let err = s.put("a/b", b"x").unwrap_err();
        assert!(err.is_transient(), "{err}");
        // object_store's own retries are off: one request per call.
        assert_eq!(count.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[test]
    fn refusals_are_permanent() {
        let (endpoint, _) = canned_server("403 Forbidden");
        let err = storage(endpoint).get("a").unwrap_err();
        assert!(!err.is_transient(), "{err}");
        let (endpoint, _) = canned_server("400 Bad Request");
        let err = storage(endpoint).get("a").unwrap_err();
        assert!(!err.is_transient(), "{err}");
    }

    #[test]
    fn unreachable_endpoint_is_transient() {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let err = storage(format!("http://127.0.0.1:{port}"))
            .exists("a")
            .unwrap_err();
        assert!(err.is_transient(), "{err}");
    }

    #[test]
    fn urls_and_settings_are_checked() {
        let c = S3Config::from_url("s3://my-bucket/a/b/").unwrap();
        assert_eq!((c.bucket.as_str(), c.prefix.as_str()), ("my-bucket", "a/b"));
        assert_eq!(S3Config::from_url("s3://my-bucket").unwrap().prefix, "");
        assert!(S3Config::from_url("/srv/repo").is_err());
        assert!(S3Config::from_url("s3://B").is_err());
        assert!(S3Config::from_url("s3://bucket/a/../b").is_err());
        let mut small = c.clone();
        small.part_size = 1024;
        assert!(matches!(
            S3Storage::new(small),
            Err(StorageError::Config(_))
        ));
        for packs in [0, MAX_UPLOAD_CONCURRENCY + 1, usize::MAX] {
            let mut many = c.clone();
            many.upload_concurrency = packs;
            match S3Storage::new(many) {
                Err(StorageError::Config(m)) => {
                    assert!(
                        m.contains("upload_concurrency must be between 1 and 16"),
                        "{m}"
                    )
                }
                other => panic!("{packs} packs in flight accepted: {other:?}"),
            }
        }
    }

    #[test]
    fn storage_can_be_used_and_dropped_inside_another_runtime() {
        let (endpoint, count) = canned_server("500 Internal Server Error");
        let s = Arc::new(storage(endpoint));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let err = tokio::spawn(async move {
                let err = s.get("k").unwrap_err();
                drop(s);
                err
            })
            .await
            .unwrap();
            assert!(err.is_transient());
        });
        assert_eq!(count.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[test]
    fn status_codes_are_found_in_messages() {
        assert_eq!(
            http_status("Error performing PUT x in 1ms - Server returned non-2xx status code: 503 Service Unavailable: "),
            Some(503)
        );
        assert_eq!(http_status("connection reset"), None);
    }
}
