//! What every object-store repository shares, whatever the service (S3,
//! Azure Blob Storage, Google Cloud Storage): an `Arc<dyn ObjectStore>` from the `object_store`
//! crate driven through the synchronous [`Storage`] trait, with bounded
//! requests in flight, multipart uploads above a threshold, sorted recursive
//! listing and one error classifier. The service-specific modules ([`super::s3`],
//! [`super::azure`], [`super::gcs`]) only build the store from their settings.
//!
//! The [`Storage`] trait is synchronous and is called from plain threads and
//! from inside tokio tasks alike, so each store owns a small tokio runtime of
//! its own: each call is spawned onto it and the caller waits on a blocking
//! channel. (`Runtime::block_on` would panic when the caller is itself a
//! runtime thread.)
//!
//! Atomicity: an object becomes visible only when a single PUT or the
//! completion of a multipart upload succeeds (S3's CompleteMultipartUpload,
//! Azure's Put Block List, GCS's XML API CompleteMultipartUpload), so a reader never sees a partial object. Objects
//! larger than `multipart_threshold` go up in `part_size` parts, several at
//! once; an upload that fails is aborted so its parts do not linger. At most
//! `max_concurrency` requests are in flight per store; a backup keeps
//! `upload_concurrency` packs in flight, each one PUT.
//!
//! `object_store`'s own retry loop is switched off by the builders: retries
//! are decided in one place, by [`StorageError::is_transient`] in
//! [`super::RetryingStorage`].

use std::error::Error as StdError;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::client::HttpError;
use object_store::path::Path;
use object_store::prefix::PrefixStore;
use object_store::{ClientOptions, ObjectStore, PutPayload, RetryConfig};
use tokio::sync::Semaphore;

use super::{
    list_dir, validate_key, validate_prefix, ObjectSize, Storage, StorageError, StorageResult,
};

/// The smallest part S3 accepts in a multipart upload (all but the last);
/// Azure blocks have no minimum, the same floor keeps part counts sane.
pub const MIN_PART_SIZE: usize = 5 * 1024 * 1024;

/// Objects above this go up as multipart uploads by default. Packs (about
/// 17 MB) and WAL segments stay below: they go up in parallel with each
/// other, and one PUT is one request where a multipart upload is at least
/// three (and a server that assembles the parts writes every byte twice).
pub const DEFAULT_MULTIPART_THRESHOLD: usize = 64 * 1024 * 1024;

/// Part size of multipart uploads by default.
pub const DEFAULT_PART_SIZE: usize = 8 * 1024 * 1024;

/// Packs stored at once by default: enough to keep a loopback or LAN
/// service busy while the backup compresses the next ones.
pub const DEFAULT_UPLOAD_CONCURRENCY: usize = 4;

/// The most packs a backup may store at once (each holds ~17 MB).
pub const MAX_UPLOAD_CONCURRENCY: usize = 16;

/// Ranged reads one reader of a file keeps in flight on an object store
/// (see [`Storage::concurrent_reads`]): with a restore's four writers, four
/// each fill the store's default eight permits twice over, so a request
/// always waits to go when one ends.
pub const CLOUD_READS_PER_FILE: usize = 4;

/// How a store moves bytes, whatever the service: part of every
/// object-store configuration ([`super::S3Config`], [`super::AzureConfig`],
/// [`super::GcsConfig`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuning {
    /// Objects larger than this go up as multipart uploads (S3, GCS) or
    /// blocks and a block list (Azure).
    pub multipart_threshold: usize,
    /// Size of each part or block.
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

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            multipart_threshold: DEFAULT_MULTIPART_THRESHOLD,
            part_size: DEFAULT_PART_SIZE,
            max_concurrency: 8,
            upload_concurrency: DEFAULT_UPLOAD_CONCURRENCY,
            request_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(5),
        }
    }
}

impl Tuning {
    /// Refuses settings no service would work with.
    pub fn check(&self) -> StorageResult<()> {
        if self.part_size < MIN_PART_SIZE {
            return Err(StorageError::Config(format!(
                "part size {} is below the minimum of {MIN_PART_SIZE} bytes",
                self.part_size
            )));
        }
        if self.multipart_threshold < self.part_size {
            return Err(StorageError::Config(format!(
                "multipart threshold {} is below the part size {}",
                self.multipart_threshold, self.part_size
            )));
        }
        if self.max_concurrency == 0 {
            return Err(StorageError::Config(
                "max_concurrency must be at least 1".into(),
            ));
        }
        if !(1..=MAX_UPLOAD_CONCURRENCY).contains(&self.upload_concurrency) {
            return Err(StorageError::Config(format!(
                "upload_concurrency must be between 1 and {MAX_UPLOAD_CONCURRENCY}, got {}",
                self.upload_concurrency
            )));
        }
        Ok(())
    }

    /// No retries inside `object_store`: [`super::RetryingStorage`] decides.
    pub fn retry_config() -> RetryConfig {
        RetryConfig {
            max_retries: 0,
            ..RetryConfig::default()
        }
    }

    /// HTTP client settings: deadlines, and plain http when `allow_http`.
    pub fn client_options(&self, allow_http: bool) -> ClientOptions {
        ClientOptions::new()
            .with_allow_http(allow_http)
            .with_timeout(self.request_timeout)
            .with_connect_timeout(self.connect_timeout)
    }
}

/// `http(s)://host[:port][/path]` with nothing that could smuggle another
/// request or header; plain http only for an emulator.
/// Splits `url` of the form `<scheme>container/prefix` into the container
/// (not checked here: each service names them by its own rules) and the
/// prefix, trimmed of slashes and held to the repository's key rules.
/// `form` and `noun` word the errors ("an s3://bucket/prefix URL", "key").
pub(crate) fn split_url<'a>(
    url: &'a str,
    scheme: &str,
    form: &str,
    noun: &str,
) -> StorageResult<(&'a str, String)> {
    let rest = url
        .strip_prefix(scheme)
        .ok_or_else(|| StorageError::Config(format!("{url:?} is not {form}")))?;
    let (container, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let prefix = prefix.trim_matches('/').to_string();
    validate_prefix(&prefix)
        .map_err(|_| StorageError::Config(format!("invalid {noun} prefix {prefix:?}")))?;
    Ok((container, prefix))
}

pub(crate) fn checked_endpoint(endpoint: &str, allow_http: bool) -> StorageResult<String> {
    let trimmed = endpoint.trim_end_matches('/');
    let rest = trimmed
        .strip_prefix("https://")
        .or_else(|| trimmed.strip_prefix("http://").filter(|_| allow_http));
    let valid = rest.is_some_and(|r| {
        !r.is_empty()
            && !r.starts_with('/')
            && r.chars().all(|c| c.is_ascii_graphic())
            && !r.contains(['?', '#', '@', '\\'])
    });
    if !valid {
        return Err(StorageError::Config(format!(
            "{endpoint:?} is not a usable endpoint (https://host[:port]; http:// only for an emulator)"
        )));
    }
    Ok(trimmed.to_string())
}

/// A repository in an object store (under a key prefix).
pub(crate) struct ObjectStorage {
    store: Arc<dyn ObjectStore>,
    handle: tokio::runtime::Handle,
    /// Kept only to be shut down on drop (without blocking: the last
    /// reference may be dropped inside another runtime).
    runtime: Option<tokio::runtime::Runtime>,
    permits: Arc<Semaphore>,
    tuning: Tuning,
    /// Which service, for log lines and messages (`s3`, `azure`, `gcs`).
    service: &'static str,
    /// What [`Storage::describe`] answers.
    description: String,
}

impl std::fmt::Debug for ObjectStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectStorage")
            .field("description", &self.description)
            .field("tuning", &self.tuning)
            .finish_non_exhaustive()
    }
}

impl Drop for ObjectStorage {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl ObjectStorage {
    /// Serves `store` under `prefix` (no leading or trailing `/`; may be empty).
    pub fn new<S: ObjectStore>(
        service: &'static str,
        store: S,
        prefix: &str,
        tuning: Tuning,
        description: String,
    ) -> StorageResult<Self> {
        tuning.check()?;
        let store: Arc<dyn ObjectStore> = if prefix.is_empty() {
            Arc::new(store)
        } else {
            Arc::new(PrefixStore::new(store, prefix))
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name(format!("strata-{service}"))
            .enable_all()
            .build()
            .map_err(|e| {
                StorageError::Config(format!("cannot start the {service} client runtime: {e}"))
            })?;
        Ok(ObjectStorage {
            store,
            handle: runtime.handle().clone(),
            runtime: Some(runtime),
            permits: Arc::new(Semaphore::new(tuning.max_concurrency)),
            tuning,
            service,
            description,
        })
    }

    /// Runs `work` on this store's runtime and waits for it from any thread.
    pub(crate) fn call<T, F>(&self, op: &'static str, key: &str, work: F) -> StorageResult<T>
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
        tracing::debug!(
            "{} {op} {key}: {} ms",
            self.service,
            started.elapsed().as_millis()
        );
        answer.unwrap_or_else(|_| {
            Err(StorageError::Remote {
                op,
                key: key.to_string(),
                message: format!("the {} client runtime stopped", self.service),
                transient: false,
            })
        })
    }

    /// The runtime requests run on.
    pub(crate) fn handle(&self) -> &tokio::runtime::Handle {
        &self.handle
    }

    /// One version of `key` (whole, or `len` bytes from `offset`), by the
    /// version id the store gave it.
    pub(crate) fn get_version(
        &self,
        key: &str,
        version: &str,
        range: Option<(u64, u64)>,
    ) -> StorageResult<Vec<u8>> {
        validate_key(key)?;
        let request = self.request_context("get", key);
        let version = version.to_string();
        self.call("get", key, async move {
            let path = request.path()?;
            let mut options = object_store::GetOptions {
                version: Some(version),
                ..Default::default()
            };
            if let Some((offset, len)) = range {
                let end = offset
                    .checked_add(len)
                    .ok_or_else(|| StorageError::ShortRead {
                        key: request.key.clone(),
                        offset,
                        len,
                    })?;
                options.range = Some((offset..end).into());
            }
            let _permit = request.permit().await?;
            let result = request
                .store
                .get_opts(&path, options)
                .await
                .map_err(|e| request.fail(e))?;
            let bytes = result.bytes().await.map_err(|e| request.fail(e))?;
            Ok(bytes.to_vec())
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
                message: "the object store client is shutting down".into(),
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

impl Storage for ObjectStorage {
    fn put(&self, key: &str, data: &[u8]) -> StorageResult<()> {
        // The request runs on this store's runtime and must own its bytes.
        self.put_bytes(key, Bytes::copy_from_slice(data))
    }

    fn put_bytes(&self, key: &str, data: Bytes) -> StorageResult<()> {
        validate_key(key)?;
        let request = self.request_context("put", key);
        let c = &self.tuning;
        let upload = request.put(data, c.multipart_threshold, c.part_size, c.max_concurrency);
        self.call("put", key, upload)
    }

    fn concurrent_puts(&self) -> usize {
        self.tuning.upload_concurrency
    }

    fn concurrent_reads(&self) -> usize {
        // The requests of all readers share `max_concurrency` permits.
        CLOUD_READS_PER_FILE.min(self.tuning.max_concurrency)
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
        self.description.clone()
    }
}

/// Turns an `object_store` error into ours and decides whether it is
/// transient: transport failures (connect, reset, timeout, a body cut short)
/// and HTTP 5xx, 429 and 408 are; other answers from the service are not.
fn classify(op: &'static str, key: &str, err: object_store::Error) -> StorageError {
    use object_store::Error as E;
    let message = error_chain(&err);
    let transient = match &err {
        // A write or a listing has no object to miss: the bucket or container is.
        E::NotFound { .. } if op == "put" || op == "list" => {
            return StorageError::Remote {
                op,
                key: key.to_string(),
                message: format!("{message} (does the bucket or container exist?)"),
                transient: false,
            }
        }
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

/// Implements [`Storage`] for a service's type by handing every call to its
/// `inner` [`ObjectStorage`].
macro_rules! forward_storage {
    ($t:ty) => {
        impl $crate::storage::Storage for $t {
            fn put(&self, key: &str, data: &[u8]) -> $crate::storage::StorageResult<()> {
                self.inner.put(key, data)
            }
            fn put_bytes(
                &self,
                key: &str,
                data: bytes::Bytes,
            ) -> $crate::storage::StorageResult<()> {
                self.inner.put_bytes(key, data)
            }
            fn concurrent_puts(&self) -> usize {
                self.inner.concurrent_puts()
            }
            fn concurrent_reads(&self) -> usize {
                self.inner.concurrent_reads()
            }
            fn get(&self, key: &str) -> $crate::storage::StorageResult<Vec<u8>> {
                self.inner.get(key)
            }
            fn get_range(
                &self,
                key: &str,
                offset: u64,
                len: u64,
            ) -> $crate::storage::StorageResult<Vec<u8>> {
                self.inner.get_range(key, offset, len)
            }
            fn list(&self, prefix: &str) -> $crate::storage::StorageResult<Vec<String>> {
                self.inner.list(prefix)
            }
            fn list_sizes(
                &self,
                prefix: &str,
            ) -> $crate::storage::StorageResult<Vec<$crate::storage::ObjectSize>> {
                self.inner.list_sizes(prefix)
            }
            fn delete(&self, key: &str) -> $crate::storage::StorageResult<()> {
                self.inner.delete(key)
            }
            fn exists(&self, key: &str) -> $crate::storage::StorageResult<bool> {
                self.inner.exists(key)
            }
            fn describe(&self) -> String {
                self.inner.describe()
            }
        }
    };
}
pub(crate) use forward_storage;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes_are_found_in_messages() {
        assert_eq!(
            http_status("Error performing PUT x in 1ms - Server returned non-2xx status code: 503 Service Unavailable: "),
            Some(503)
        );
        assert_eq!(http_status("connection reset"), None);
    }
}
