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

use object_store::aws::AmazonS3Builder;

use super::cloud::{ObjectStorage, Tuning};
use super::{validate_prefix, StorageError, StorageResult};

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
        validate_prefix(&prefix)
            .map_err(|_| StorageError::Config(format!("invalid key prefix {prefix:?}")))?;
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
    inner: ObjectStorage,
    config: S3Config,
}

impl std::fmt::Debug for S3Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Storage")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl S3Storage {
    /// Sets up the client; no request is made until the first call.
    pub fn new(config: S3Config) -> StorageResult<Self> {
        let tuning = config.tuning;
        tuning.check()?;
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
        Ok(S3Storage { inner, config })
    }

    /// The configuration the store was made with.
    pub fn config(&self) -> &S3Config {
        &self.config
    }
}

super::cloud::forward_storage!(S3Storage);

#[cfg(test)]
mod tests {
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
