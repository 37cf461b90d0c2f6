//! A repository in an S3-compatible object store (AWS S3, MinIO, Ceph RGW,
//! Alibaba OSS, s3s-fs, …), through the `object_store` crate's Amazon S3
//! client: request signing (SigV4), credentials and the wire protocol are its
//! job, not ours. Requests, uploads, listing and error classification are
//! shared with the other object stores in [`super::cloud`].
//!
//! Atomicity: an object becomes visible only when a single PUT or a
//! CompleteMultipartUpload succeeds (Amazon S3 User Guide, "Uploading and
//! copying objects using multipart upload"), so a reader never sees a partial
//! object.
//!
//! Immutability (Amazon S3 User Guide, "Locking objects with Object Lock"):
//! with [`S3Config::object_lock`], every pack, manifest and WAL object is
//! given a retention right after it is stored (PutObjectRetention), and a
//! pack a new backup set references again has its retention pushed out
//! ([`Storage::retain`]). Deleting such an object removes its versions for
//! good once their date has passed; before that the store refuses, and the
//! call fails with [`StorageError::Locked`] without leaving a delete marker.
//! With [`S3Config::as_of`] the store is a read-only view of the bucket as it
//! was at that time, read from its object versions.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use object_store::aws::AmazonS3Builder;

use super::cloud::{checked_endpoint, split_url, ObjectStorage, Tuning};
use super::s3api::{ApiSettings, LockMode, LockState, S3Api};
use super::{list_dir, validate_key, ObjectSize, Storage, StorageError, StorageResult};

/// Object Lock settings of a repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObjectLock {
    /// Governance or compliance retention.
    pub mode: LockMode,
    /// How long an object is protected after it is written or referenced
    /// again: the longest backup or log retention of the repository's
    /// instances plus a margin.
    pub days: u32,
}

/// A reused pack's retention is renewed at most once a day per process.
const RENEW_SLACK: chrono::Duration = chrono::Duration::days(1);

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
    /// Part sizes, concurrency and deadlines.
    pub tuning: Tuning,
    /// Protect packs, manifests and WAL objects with Object Lock; the bucket
    /// must have Object Lock enabled.
    pub object_lock: Option<ObjectLock>,
    /// Read the repository as it was at this time, from the bucket's object
    /// versions; every write is refused.
    pub as_of: Option<DateTime<Utc>>,
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
            .field("tuning", &self.tuning)
            .field("object_lock", &self.object_lock)
            .field("as_of", &self.as_of)
            .finish_non_exhaustive()
    }
}

impl S3Config {
    /// Parses `s3://bucket[/prefix]`; every other setting takes its default.
    pub fn from_url(url: &str) -> StorageResult<Self> {
        let (bucket, prefix) = split_url(url, "s3://", "an s3://bucket/prefix URL", "key")?;
        let valid_bucket = (3..=63).contains(&bucket.len())
            && bucket
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.');
        if !valid_bucket {
            return Err(StorageError::Config(format!(
                "{bucket:?} is not a valid bucket name (3-63 lower-case letters, digits, '-' or '.')"
            )));
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
            tuning: Tuning::default(),
            object_lock: None,
            as_of: None,
        })
    }

    fn api_settings(&self) -> ApiSettings<'_> {
        ApiSettings {
            bucket: &self.bucket,
            prefix: &self.prefix,
            endpoint: self.endpoint.as_deref(),
            region: &self.region,
            access_key_id: self.access_key_id.as_deref(),
            secret_access_key: self.secret_access_key.as_deref(),
            session_token: self.session_token.as_deref(),
            path_style: self.path_style,
            allow_http: self.allow_http,
            request_timeout: self.tuning.request_timeout,
            connect_timeout: self.tuning.connect_timeout,
        }
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
    inner: ObjectStorage,
    config: S3Config,
    /// The signed calls object_store lacks; only with Object Lock or as-of.
    api: Option<S3Api>,
    /// The objects of an as-of view: key -> (version id, size).
    view: Option<BTreeMap<String, (String, u64)>>,
    /// Retain-until dates this process set, so a pack referenced by many
    /// sets is not renewed at every one.
    retained: Mutex<HashMap<String, DateTime<Utc>>>,
}

impl std::fmt::Debug for S3Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Storage")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl S3Storage {
    /// Sets up the client. No request is made until the first call, except
    /// with Object Lock (the bucket must have it enabled) or as-of (the
    /// bucket must be versioned; its versions are listed once).
    pub fn new(config: S3Config) -> StorageResult<Self> {
        let tuning = config.tuning;
        tuning.check()?;
        // The region names a host when no endpoint is set: letters, digits
        // and hyphens only, so it cannot point the requests elsewhere. With
        // an endpoint it is only signed (stores name theirs freely), but
        // still one printable word.
        let region_ok = (1..=64).contains(&config.region.len())
            && config.region.chars().all(|c| match config.endpoint {
                None => c.is_ascii_alphanumeric() || c == '-',
                Some(_) => c.is_ascii_graphic() && !matches!(c, '/' | '\\' | '?' | '#' | '@'),
            });
        if !region_ok {
            return Err(StorageError::Config(format!(
                "{:?} is not a region name (letters, digits and '-')",
                config.region
            )));
        }
        if let Some(endpoint) = &config.endpoint {
            checked_endpoint(endpoint, config.allow_http)?;
        }
        let mut builder = AmazonS3Builder::from_env()
            .with_bucket_name(&config.bucket)
            .with_region(&config.region)
            .with_virtual_hosted_style_request(!config.path_style)
            .with_allow_http(config.allow_http)
            .with_retry(Tuning::retry_config())
            .with_client_options(tuning.client_options(config.allow_http));
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
        let description = match &config.endpoint {
            Some(endpoint) => format!("{} at {endpoint}", config.url()),
            None => config.url(),
        };
        let inner = ObjectStorage::new("s3", s3, &config.prefix, tuning, description)?;
        let mut storage = S3Storage {
            inner,
            api: None,
            view: None,
            retained: Mutex::new(HashMap::new()),
            config,
        };
        if storage.config.object_lock.is_some() || storage.config.as_of.is_some() {
            storage.api = Some(S3Api::new(storage.config.api_settings())?);
        }
        if let Some(lock) = storage.config.object_lock {
            if lock.days == 0 {
                return Err(StorageError::Config(
                    "object_lock_days must be at least 1".into(),
                ));
            }
            if storage.config.as_of.is_none() {
                storage.check_object_lock()?;
            }
        }
        if let Some(time) = storage.config.as_of {
            storage.view = Some(storage.read_view(time)?);
        }
        Ok(storage)
    }

    fn api(&self) -> &S3Api {
        self.api.as_ref().expect("made with object_lock or as_of")
    }

    /// Refuses a bucket without Object Lock: retention could not be set.
    fn check_object_lock(&self) -> StorageResult<()> {
        let api = self.api();
        let enabled = block_on_api(&self.inner, "object-lock", api.object_lock_enabled())?;
        if !enabled {
            return Err(StorageError::Config(format!(
                "object_lock is set but bucket {} does not have Object Lock enabled \
                 (it is enabled when the bucket is created; see docs/DEPLOYMENT.md)",
                self.config.bucket
            )));
        }
        Ok(())
    }

    /// The newest version of each key not after `time`, delete markers
    /// meaning "absent".
    fn read_view(&self, time: DateTime<Utc>) -> StorageResult<BTreeMap<String, (String, u64)>> {
        let api = self.api();
        if !block_on_api(&self.inner, "versioning", api.versioning_enabled())? {
            return Err(StorageError::Config(format!(
                "--repo-as-of needs a versioned bucket; {} has no versioning, so its past \
                 is not kept",
                self.config.bucket
            )));
        }
        let versions = block_on_api(&self.inner, "versions", api.list_versions(""))?;
        let mut newest: BTreeMap<String, (DateTime<Utc>, String, u64, bool)> = BTreeMap::new();
        for v in versions.into_iter().filter(|v| v.last_modified <= time) {
            let newer = newest
                .get(&v.key)
                .is_none_or(|(seen, ..)| v.last_modified > *seen);
            if newer {
                newest.insert(
                    v.key,
                    (v.last_modified, v.version_id, v.size, v.delete_marker),
                );
            }
        }
        Ok(newest
            .into_iter()
            .filter(|(_, (_, _, _, deleted))| !deleted)
            .map(|(key, (_, version, size, _))| (key, (version, size)))
            .collect())
    }

    fn read_only(&self, op: &'static str, key: &str) -> StorageError {
        StorageError::ReadOnly {
            op,
            key: key.to_string(),
            why: format!(
                "the repository is opened as of {} (read-only)",
                self.config
                    .as_of
                    .map(|t| t.to_rfc3339())
                    .unwrap_or_default()
            ),
        }
    }

    fn version_of(&self, key: &str) -> StorageResult<Option<&(String, u64)>> {
        validate_key(key)?;
        Ok(self.view.as_ref().and_then(|v| v.get(key)))
    }

    /// Sets `key`'s retention to the lock window from now, unless this
    /// process already set one that ends no more than a day sooner.
    fn lock(&self, key: &str, lock: ObjectLock) -> StorageResult<()> {
        let until = Utc::now() + chrono::Duration::days(i64::from(lock.days));
        let known = self.retained.lock().map(|m| m.get(key).copied());
        if let Ok(Some(known)) = known {
            if known + RENEW_SLACK >= until {
                return Ok(());
            }
        }
        let api = self.api();
        let answer = block_on_api(
            &self.inner,
            "retention",
            api.put_retention(key, lock.mode, until),
        )?;
        // Renewing what is not there (an instance record not yet written)
        // protects nothing and needs nothing, whatever the store answered.
        if answer.status != 200 && !self.inner.exists(key)? {
            return Ok(());
        }
        if answer.status != 200 {
            return Err(StorageError::Remote {
                op: "put",
                key: key.to_string(),
                message: format!(
                    "setting its Object Lock retention: status {} {}",
                    answer.status,
                    answer.code()
                ),
                transient: answer.status >= 500 || answer.status == 429,
            });
        }
        if let Ok(mut known) = self.retained.lock() {
            known.insert(key.to_string(), until);
        }
        Ok(())
    }

    /// Removes every version of `key`, oldest first, and stops at the first
    /// the store refuses: what is newer stays readable, no delete marker
    /// hides it.
    fn delete_versions(&self, key: &str) -> StorageResult<()> {
        let api = self.api();
        let mut versions = block_on_api(&self.inner, "versions", api.list_versions(key))?;
        versions.retain(|v| v.key == key);
        versions.sort_by_key(|v| v.last_modified);
        for v in versions {
            let answer = block_on_api(
                &self.inner,
                "delete",
                api.delete_version(key, &v.version_id),
            )?;
            match answer.status {
                200 | 204 | 404 => {}
                403 => {
                    let shown =
                        block_on_api(&self.inner, "retention", api.retention(key, &v.version_id));
                    return Err(refusal(key, &answer.code(), shown, Utc::now()));
                }
                status => {
                    return Err(StorageError::Remote {
                        op: "delete",
                        key: key.to_string(),
                        message: format!("status {status} {}", answer.code()),
                        transient: status >= 500 || status == 429,
                    })
                }
            }
        }
        if let Ok(mut known) = self.retained.lock() {
            known.remove(key);
        }
        Ok(())
    }

    /// The configuration the store was made with.
    pub fn config(&self) -> &S3Config {
        &self.config
    }
}

/// How far a retain-until date may lie in the past and still explain a
/// refusal: the store's clock and this host's differ.
const CLOCK_SKEW: chrono::Duration = chrono::Duration::minutes(5);

/// What a refused delete of `key` (403 with `code`) means, given what a
/// HEAD of the version showed: [`StorageError::Locked`] while a retention
/// holds it, [`StorageError::DeleteRefused`] naming what else it can be (a
/// legal hold, a missing permission) otherwise. Either way the object is
/// kept and a later pass tries again.
fn refusal(
    key: &str,
    code: &str,
    shown: StorageResult<LockState>,
    now: DateTime<Utc>,
) -> StorageError {
    let refused = |reason: String| StorageError::DeleteRefused {
        key: key.to_string(),
        reason,
    };
    match shown {
        Ok(LockState {
            until: Some(until), ..
        }) if until + CLOCK_SKEW > now => StorageError::Locked {
            key: key.to_string(),
            until: Some(until),
        },
        Ok(LockState {
            legal_hold: true, ..
        }) => refused(format!(
            "status 403 {code}: an Object Lock legal hold is on"
        )),
        Ok(_) => refused(format!(
            "status 403 {code} with no Object Lock retention in force that these credentials \
             can read (check their s3:DeleteObjectVersion and s3:GetObjectRetention permissions)"
        )),
        Err(e) => refused(format!(
            "status 403 {code}; its Object Lock settings could not be read either: {e}"
        )),
    }
}

/// Runs one of [`S3Api`]'s calls on the store's runtime. The call borrows
/// the client, so it is driven here under a scoped thread's `block_on`
/// rather than spawned.
fn block_on_api<T: Send>(
    inner: &ObjectStorage,
    op: &'static str,
    work: impl std::future::Future<Output = StorageResult<T>> + Send,
) -> StorageResult<T> {
    let handle = inner.handle();
    std::thread::scope(|scope| {
        scope
            .spawn(|| handle.block_on(work))
            .join()
            .unwrap_or_else(|_| {
                Err(StorageError::Remote {
                    op,
                    key: String::new(),
                    message: "the S3 request thread panicked".into(),
                    transient: false,
                })
            })
    })
}

/// What a wipe must not reach: packs, manifests, complete WAL objects and
/// timeline histories, the repository's configuration and instance records.
/// Not locked: block indexes, which Strata compacts and can rebuild, and the
/// partial WAL segment being received with its tails, which Strata replaces
/// as WAL arrives (the complete segment is locked).
fn lockable(key: &str) -> bool {
    if key == crate::CONFIG_KEY {
        return true;
    }
    if key.starts_with("packs/") {
        return key.ends_with(".pack");
    }
    let Some(rest) = key.strip_prefix("instances/") else {
        return false;
    };
    let Some((_, within)) = rest.split_once('/') else {
        return false;
    };
    within == "instance"
        || (within.starts_with("backups/") && within.ends_with(".manifest"))
        || (within.starts_with("wal/") && !within.contains(".partial"))
}

impl Storage for S3Storage {
    fn put(&self, key: &str, data: &[u8]) -> StorageResult<()> {
        self.put_bytes(key, Bytes::copy_from_slice(data))
    }

    fn put_bytes(&self, key: &str, data: Bytes) -> StorageResult<()> {
        if self.view.is_some() {
            return Err(self.read_only("put", key));
        }
        self.inner.put_bytes(key, data)?;
        match self.config.object_lock {
            Some(lock) if lockable(key) => {
                // A new version: whatever was retained before was another one.
                if let Ok(mut known) = self.retained.lock() {
                    known.remove(key);
                }
                self.lock(key, lock)
            }
            _ => Ok(()),
        }
    }

    fn concurrent_puts(&self) -> usize {
        self.inner.concurrent_puts()
    }

    fn concurrent_reads(&self) -> usize {
        self.inner.concurrent_reads()
    }

    fn get(&self, key: &str) -> StorageResult<Vec<u8>> {
        if self.view.is_none() {
            return self.inner.get(key);
        }
        match self.version_of(key)? {
            Some((version, _)) => self.inner.get_version(key, version, None),
            None => Err(StorageError::NotFound(key.to_string())),
        }
    }

    fn get_range(&self, key: &str, offset: u64, len: u64) -> StorageResult<Vec<u8>> {
        if self.view.is_none() {
            return self.inner.get_range(key, offset, len);
        }
        let Some((version, size)) = self.version_of(key)? else {
            return Err(StorageError::NotFound(key.to_string()));
        };
        let short = || StorageError::ShortRead {
            key: key.to_string(),
            offset,
            len,
        };
        match offset.checked_add(len) {
            Some(end) if end <= *size => {}
            _ => return Err(short()),
        }
        if len == 0 {
            return Ok(Vec::new());
        }
        let bytes = self.inner.get_version(key, version, Some((offset, len)))?;
        if bytes.len() as u64 != len {
            return Err(short());
        }
        Ok(bytes)
    }

    fn list(&self, prefix: &str) -> StorageResult<Vec<String>> {
        Ok(self
            .list_sizes(prefix)?
            .into_iter()
            .map(|o| o.key)
            .collect())
    }

    fn list_sizes(&self, prefix: &str) -> StorageResult<Vec<ObjectSize>> {
        let Some(view) = &self.view else {
            return self.inner.list_sizes(prefix);
        };
        let dir = list_dir(prefix)?.map(|d| format!("{d}/"));
        Ok(view
            .iter()
            .filter(|(key, _)| dir.as_deref().is_none_or(|d| key.starts_with(d)))
            .map(|(key, (_, size))| ObjectSize {
                key: key.clone(),
                size: *size,
            })
            .collect())
    }

    fn delete(&self, key: &str) -> StorageResult<()> {
        if self.view.is_some() {
            return Err(self.read_only("delete", key));
        }
        validate_key(key)?;
        match self.config.object_lock {
            Some(_) if lockable(key) => self.delete_versions(key),
            _ => self.inner.delete(key),
        }
    }

    fn exists(&self, key: &str) -> StorageResult<bool> {
        if self.view.is_none() {
            return self.inner.exists(key);
        }
        Ok(self.version_of(key)?.is_some())
    }

    fn retain(&self, key: &str) -> StorageResult<()> {
        match (self.config.object_lock, &self.view) {
            (Some(lock), None) if lockable(key) => {
                validate_key(key)?;
                self.lock(key, lock)
            }
            _ => Ok(()),
        }
    }

    fn describe(&self) -> String {
        match self.config.as_of {
            Some(time) => format!("{} as of {}", self.inner.describe(), time.to_rfc3339()),
            None => self.inner.describe(),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn what_is_locked() {
        for key in [
            "strata-repo.json",
            "packs/ab/abcdef.pack",
            "instances/i1/instance",
            "instances/i1/backups/b1.manifest",
            "instances/i1/wal/00000001/000000010000000000000003",
            "instances/i1/wal/00000002.history",
        ] {
            assert!(super::lockable(key), "{key}");
        }
        for key in [
            "instances/i1/index/r1-0000.run",
            "instances/i1/wal/00000001/000000010000000000000004.partial",
            "instances/i1/wal/00000001/000000010000000000000004.partial.d/0-1",
            "packs/ab/tmp",
            "other",
        ] {
            assert!(!super::lockable(key), "{key}");
        }
    }

    use std::io::{Read, Write};
    use std::net::TcpListener;

    use super::*;
    use std::sync::Arc;

    use crate::storage::cloud::MAX_UPLOAD_CONCURRENCY;
    use crate::storage::Storage;

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

    /// A server that answers 404 and hands back the first request line.
    fn request_line_server() -> (String, std::sync::mpsc::Receiver<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let Ok((mut stream, _)) = listener.accept() else {
                return;
            };
            let mut buf = [0u8; 65536];
            let n = stream.read(&mut buf).unwrap_or(0);
            let text = String::from_utf8_lossy(&buf[..n]).to_string();
            let _ = tx.send(text.lines().next().unwrap_or_default().to_string());
            let _ = write!(
                stream,
                "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
        });
        (format!("http://{addr}"), rx)
    }

    #[test]
    fn a_virtual_hosted_endpoint_is_the_buckets_own_url() {
        // As for Alibaba OSS: `https://<bucket>.s3.oss-<region>.aliyuncs.com`
        // with path_style off; the bucket is not repeated in the path.
        let (endpoint, seen) = request_line_server();
        let mut config = S3Config::from_url("s3://my-backups/pre").unwrap();
        config.endpoint = Some(endpoint);
        config.access_key_id = Some("AKID".into());
        config.secret_access_key = Some("SECRET".into());
        config.allow_http = true;
        config.path_style = false;
        assert!(!S3Storage::new(config).unwrap().exists("a/b").unwrap());
        assert_eq!(seen.recv().unwrap(), "HEAD /pre/a/b HTTP/1.1");
    }

    /// A refused delete is a lock only while a retention (give or take
    /// the clocks' difference) holds the version; otherwise it is kept as
    /// refused, saying what the store showed.
    #[test]
    fn what_a_refused_delete_means() {
        let now = Utc::now();
        let state = |until: Option<i64>, legal_hold: bool| {
            Ok(LockState {
                until: until.map(|m| now + chrono::Duration::minutes(m)),
                legal_hold,
            })
        };
        let said = |e: StorageError| match e {
            StorageError::Locked { until, .. } => format!("locked {}", until.is_some()),
            StorageError::DeleteRefused { reason, .. } => format!("refused: {reason}"),
            other => format!("other: {other}"),
        };
        assert_eq!(
            said(refusal("k", "AccessDenied", state(Some(60), false), now)),
            "locked true"
        );
        // A date a little in the past: the store's clock may be behind.
        assert_eq!(
            said(refusal("k", "AccessDenied", state(Some(-2), false), now)),
            "locked true"
        );
        let past = said(refusal("k", "AccessDenied", state(Some(-60), false), now));
        assert!(past.contains("s3:DeleteObjectVersion"), "{past}");
        let none = said(refusal("k", "AccessDenied", state(None, false), now));
        assert!(
            none.starts_with("refused: status 403 AccessDenied with no"),
            "{none}"
        );
        let held = said(refusal("k", "AccessDenied", state(None, true), now));
        assert!(held.contains("legal hold is on"), "{held}");
        let unread = refusal(
            "k",
            "AccessDenied",
            Err(StorageError::Config("HEAD refused".into())),
            now,
        );
        assert!(unread.is_kept());
        assert!(said(unread).contains("could not be read either"));
    }

    /// An endpoint or region that would send the requests (and their
    /// signatures) somewhere else than the service named is refused.
    #[test]
    fn hostile_endpoints_and_regions_are_refused() {
        let config = |endpoint: Option<&str>, region: &str| {
            let mut c = S3Config::from_url("s3://bucket/pre").unwrap();
            c.endpoint = endpoint.map(str::to_string);
            c.region = region.to_string();
            c.access_key_id = Some("AKID".into());
            c.secret_access_key = Some("SECRET".into());
            c
        };
        for endpoint in [
            "https://user:pw@example.com",
            "https://example.com\r\nX: y",
            "https://example.com/?a",
            "https://example.com#frag",
            "ftp://example.com",
            "http://example.com",
            "https://",
            "https:///x",
        ] {
            let err = S3Storage::new(config(Some(endpoint), "us-east-1")).unwrap_err();
            assert!(
                matches!(err, StorageError::Config(_)),
                "{endpoint:?}: {err}"
            );
        }
        for region in [
            "",
            "evil.com/x?",
            "us-east-1.evil.com",
            "a b",
            "a\nb",
            &"r".repeat(65),
        ] {
            let err = S3Storage::new(config(None, region)).unwrap_err();
            assert!(matches!(err, StorageError::Config(_)), "{region:?}: {err}");
        }
        // Plain http only when allowed; ordinary names pass.
        let mut c = config(Some("http://127.0.0.1:9000"), "us-east-1");
        c.allow_http = true;
        S3Storage::new(c).unwrap();
        S3Storage::new(config(None, "eu-central-1")).unwrap();
        // With an endpoint the region is only signed: S3-compatible stores
        // name theirs freely, but it stays one word.
        S3Storage::new(config(Some("https://ceph.example"), "zone_group.1")).unwrap();
        for region in ["a/b", "a b", "a?b", "a@b"] {
            assert!(S3Storage::new(config(Some("https://ceph.example"), region)).is_err());
        }
        S3Storage::new(config(
            Some("https://s3.oss-cn-hangzhou.aliyuncs.com/"),
            "oss-cn-hangzhou",
        ))
        .unwrap();
    }

    #[test]
    fn urls_and_settings_are_checked() {
        let c = S3Config::from_url("s3://my-bucket/a/b/").unwrap();
        assert_eq!((c.bucket.as_str(), c.prefix.as_str()), ("my-bucket", "a/b"));
        assert_eq!(S3Config::from_url("s3://my-bucket").unwrap().prefix, "");
        assert!(S3Config::from_url("/srv/repo").is_err());
        assert!(S3Config::from_url("s3://B").is_err());
        assert!(S3Config::from_url("s3://bucket/a/../b").is_err());
        for prefix in ["..", "a//b", "a\nb", "a\u{0}b", "a\u{7f}b"] {
            let url = format!("s3://bucket/{prefix}");
            assert!(S3Config::from_url(&url).is_err(), "{prefix:?}");
        }
        let mut small = c.clone();
        small.tuning.part_size = 1024;
        assert!(matches!(
            S3Storage::new(small),
            Err(StorageError::Config(_))
        ));
        for packs in [0, MAX_UPLOAD_CONCURRENCY + 1, usize::MAX] {
            let mut many = c.clone();
            many.tuning.upload_concurrency = packs;
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
}
