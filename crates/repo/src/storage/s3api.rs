//! The S3 calls the `object_store` crate does not make, as SigV4-signed
//! requests of their own: Object Lock (GetObjectLockConfiguration,
//! PutObjectRetention, GetObjectRetention), versioning (GetBucketVersioning,
//! ListObjectVersions) and the deletion of one object version.
//!
//! Reference: Amazon S3 API Reference, the actions of those names. S3
//! requires every `x-amz-*` header to be signed, so these requests are signed
//! whole by the `aws-sigv4` crate and sent with the `reqwest` client that
//! `object_store` already brings.

use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{
    sign, PayloadChecksumKind, PercentEncodingMode, SignableBody, SignableRequest, SigningSettings,
    UriPathNormalizationMode,
};
use aws_sigv4::sign::v4;
use base64::Engine;
use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use md5::Digest;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde::Deserialize;

use super::{StorageError, StorageResult};

/// What S3 leaves unencoded in a key: the unreserved characters and `/`.
const KEY: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b'/');

/// The same for a query value (`/` encoded too).
const QUERY: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// How an Object Lock retention may be lifted before its date.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// Users with `s3:BypassGovernanceRetention` may shorten or remove it.
    Governance,
    /// Nobody can shorten or remove it, the account's root user included.
    Compliance,
}

impl LockMode {
    fn wire(self) -> &'static str {
        match self {
            LockMode::Governance => "GOVERNANCE",
            LockMode::Compliance => "COMPLIANCE",
        }
    }
}

/// One version of an object (or a delete marker) from ListObjectVersions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ObjectVersion {
    /// Key relative to the repository prefix.
    pub key: String,
    pub version_id: String,
    pub last_modified: DateTime<Utc>,
    pub size: u64,
    pub delete_marker: bool,
}

/// A signed-request client for one bucket, under one key prefix.
#[derive(Debug)]
pub(crate) struct S3Api {
    client: reqwest::Client,
    /// `scheme://host[:port]`.
    origin: String,
    /// `/bucket` with path-style requests, empty with virtual-hosted ones.
    bucket_path: String,
    /// The repository's key prefix with a trailing `/`, or empty.
    prefix: String,
    region: String,
    credentials: Credentials,
    /// For messages.
    bucket: String,
}

/// The parts of an answer a caller looks at.
pub(crate) struct Answer {
    pub status: u16,
    pub body: Bytes,
    /// `x-amz-object-lock-retain-until-date`, on a HEAD of a locked object.
    pub retain_until: Option<String>,
    /// `x-amz-object-lock-legal-hold` (`ON`/`OFF`), on a HEAD.
    pub legal_hold: Option<String>,
}

/// What a HEAD of one version shows of its Object Lock.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct LockState {
    /// The retain-until date, when the store showed one.
    pub until: Option<DateTime<Utc>>,
    /// A legal hold is on.
    pub legal_hold: bool,
}

impl Answer {
    /// The `<Code>` of an S3 error body, if any.
    pub fn code(&self) -> String {
        #[derive(Deserialize)]
        struct Error {
            #[serde(rename = "Code")]
            code: String,
        }
        quick_xml::de::from_str::<Error>(&String::from_utf8_lossy(&self.body))
            .map(|e| e.code)
            .unwrap_or_default()
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body)
            .chars()
            .take(300)
            .collect()
    }
}

/// Settings the client is made from (a subset of the S3 configuration).
pub(crate) struct ApiSettings<'a> {
    pub bucket: &'a str,
    pub prefix: &'a str,
    pub endpoint: Option<&'a str>,
    pub region: &'a str,
    pub access_key_id: Option<&'a str>,
    pub secret_access_key: Option<&'a str>,
    pub session_token: Option<&'a str>,
    pub path_style: bool,
    pub allow_http: bool,
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
}

impl S3Api {
    /// Static credentials from the settings, else the `AWS_*` environment.
    pub fn new(s: ApiSettings<'_>) -> StorageResult<Self> {
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let (id, secret, token) = match (s.access_key_id, s.secret_access_key) {
            (Some(id), Some(secret)) => (
                id.to_string(),
                secret.to_string(),
                s.session_token.map(str::to_string),
            ),
            _ => match (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY")) {
                (Some(id), Some(secret)) => (id, secret, env("AWS_SESSION_TOKEN")),
                _ => {
                    return Err(StorageError::Config(
                        "Object Lock and --repo-as-of need static credentials ([s3] \
                         access_key_id/secret_access_key or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)"
                            .into(),
                    ))
                }
            },
        };
        let credentials = Credentials::new(id, secret, token, None, "strata");
        let endpoint = match s.endpoint {
            Some(e) => super::cloud::checked_endpoint(e, s.allow_http)?,
            None => format!("https://s3.{}.amazonaws.com", s.region),
        };
        let (origin, bucket_path) = if s.path_style {
            (endpoint, format!("/{}", s.bucket))
        } else {
            let (scheme, host) = endpoint.split_once("://").ok_or_else(|| {
                StorageError::Config(format!("endpoint {endpoint:?} has no scheme"))
            })?;
            (format!("{scheme}://{}.{host}", s.bucket), String::new())
        };
        let client = reqwest::Client::builder()
            .timeout(s.request_timeout)
            .connect_timeout(s.connect_timeout)
            .build()
            .map_err(|e| StorageError::Config(format!("cannot build the S3 HTTP client: {e}")))?;
        let prefix = if s.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", s.prefix)
        };
        Ok(S3Api {
            client,
            origin,
            bucket_path,
            prefix,
            region: s.region.to_string(),
            credentials,
            bucket: s.bucket.to_string(),
        })
    }

    /// One signed request on the bucket (`key` = None) or on an object;
    /// `query` is already encoded (`versions&prefix=a%2Fb`).
    async fn send(
        &self,
        method: &str,
        key: Option<&str>,
        query: &str,
        headers: &[(&str, String)],
        body: Bytes,
    ) -> StorageResult<Answer> {
        let op: &'static str = match method {
            "GET" => "GET",
            "HEAD" => "HEAD",
            "PUT" => "PUT",
            "DELETE" => "DELETE",
            _ => "request",
        };
        let what = key.unwrap_or("").to_string();
        let mut path = self.bucket_path.clone();
        path.push('/');
        if let Some(key) = key {
            let full = format!("{}{key}", self.prefix);
            path.push_str(&utf8_percent_encode(&full, KEY).to_string());
        }
        let url = if query.is_empty() {
            format!("{}{path}", self.origin)
        } else {
            format!("{}{path}?{query}", self.origin)
        };
        let mut settings = SigningSettings::default();
        settings.percent_encoding_mode = PercentEncodingMode::Single;
        settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
        settings.uri_path_normalization_mode = UriPathNormalizationMode::Disabled;
        let identity = self.credentials.clone().into();
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region(&self.region)
            .name("s3")
            .time(SystemTime::now())
            .settings(settings)
            .build()
            .map_err(|e| StorageError::Config(format!("signing: {e}")))?
            .into();
        let signable = SignableRequest::new(
            method,
            url.as_str(),
            headers.iter().map(|(n, v)| (*n, v.as_str())),
            SignableBody::Bytes(&body),
        )
        .map_err(|e| StorageError::Config(format!("signing {url}: {e}")))?;
        let (instructions, _) = sign(signable, &params)
            .map_err(|e| StorageError::Config(format!("signing {url}: {e}")))?
            .into_parts();
        let method = reqwest::Method::from_bytes(method.as_bytes())
            .map_err(|e| StorageError::Config(e.to_string()))?;
        let mut request = self.client.request(method, &url);
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        let (signed_headers, _) = instructions.into_parts();
        for header in signed_headers {
            request = request.header(header.name(), header.value());
        }
        let response = request.body(body).send().await.map_err(|e| {
            let transient = e.is_timeout() || e.is_connect() || e.is_request();
            StorageError::Remote {
                op,
                key: what.clone(),
                message: format!("{url}: {e}"),
                transient,
            }
        })?;
        let status = response.status().as_u16();
        let retain_until = response
            .headers()
            .get("x-amz-object-lock-retain-until-date")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let legal_hold = response
            .headers()
            .get("x-amz-object-lock-legal-hold")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = response.bytes().await.map_err(|e| StorageError::Remote {
            op,
            key: what.clone(),
            message: format!("{url}: reading the answer: {e}"),
            transient: true,
        })?;
        Ok(Answer {
            status,
            body,
            retain_until,
            legal_hold,
        })
    }

    fn unexpected(op: &'static str, key: &str, answer: &Answer) -> StorageError {
        let status = answer.status;
        StorageError::Remote {
            op,
            key: key.to_string(),
            message: format!("status {status}: {}", answer.text()),
            transient: status >= 500 || status == 429 || status == 408,
        }
    }

    /// Whether the bucket has Object Lock enabled (GetObjectLockConfiguration).
    pub async fn object_lock_enabled(&self) -> StorageResult<bool> {
        #[derive(Deserialize)]
        struct Config {
            #[serde(rename = "ObjectLockEnabled", default)]
            enabled: String,
        }
        let answer = self
            .send("GET", None, "object-lock=", &[], Bytes::new())
            .await?;
        match answer.status {
            200 => Ok(
                quick_xml::de::from_str::<Config>(&String::from_utf8_lossy(&answer.body))
                    .map(|c| c.enabled == "Enabled")
                    .unwrap_or(false),
            ),
            404 if answer.code() == "ObjectLockConfigurationNotFoundError" => Ok(false),
            _ => Err(Self::unexpected("GET", &self.bucket, &answer)),
        }
    }

    /// Whether versioning is on (or was, and is suspended): older versions
    /// exist to be read (GetBucketVersioning).
    pub async fn versioning_enabled(&self) -> StorageResult<bool> {
        #[derive(Deserialize)]
        struct Versioning {
            #[serde(rename = "Status", default)]
            status: String,
        }
        let answer = self
            .send("GET", None, "versioning=", &[], Bytes::new())
            .await?;
        if answer.status != 200 {
            return Err(Self::unexpected("GET", &self.bucket, &answer));
        }
        Ok(
            quick_xml::de::from_str::<Versioning>(&String::from_utf8_lossy(&answer.body))
                .map(|v| v.status == "Enabled" || v.status == "Suspended")
                .unwrap_or(false),
        )
    }

    /// Sets the retention of the current version of `key` (PutObjectRetention).
    pub async fn put_retention(
        &self,
        key: &str,
        mode: LockMode,
        until: DateTime<Utc>,
    ) -> StorageResult<Answer> {
        let body = format!(
            "<Retention xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\"><Mode>{}</Mode>\
             <RetainUntilDate>{}</RetainUntilDate></Retention>",
            mode.wire(),
            until.to_rfc3339_opts(SecondsFormat::Secs, true)
        );
        // S3 wants a checksum of a retention request's body.
        let md5 = base64::engine::general_purpose::STANDARD.encode(md5::Md5::digest(&body));
        self.send(
            "PUT",
            Some(key),
            "retention=",
            &[("content-md5", md5)],
            Bytes::from(body),
        )
        .await
    }

    /// The retain-until date of one version of `key`, if it has one (from
    /// HeadObject, which reports it to whoever may read it).
    pub async fn retention(&self, key: &str, version_id: &str) -> StorageResult<LockState> {
        let query = format!("versionId={}", utf8_percent_encode(version_id, QUERY));
        let answer = self
            .send("HEAD", Some(key), &query, &[], Bytes::new())
            .await?;
        match answer.status {
            200 => Ok(LockState {
                until: answer
                    .retain_until
                    .and_then(|d| DateTime::parse_from_rfc3339(&d).ok())
                    .map(|d| d.with_timezone(&Utc)),
                legal_hold: answer
                    .legal_hold
                    .is_some_and(|h| h.eq_ignore_ascii_case("ON")),
            }),
            404 => Ok(LockState::default()),
            _ => Err(Self::unexpected("HEAD", key, &answer)),
        }
    }

    /// Deletes one version of `key` for good (DeleteObject with a versionId);
    /// the store's answer is returned as is, a refusal included.
    pub async fn delete_version(&self, key: &str, version_id: &str) -> StorageResult<Answer> {
        let query = format!("versionId={}", utf8_percent_encode(version_id, QUERY));
        self.send("DELETE", Some(key), &query, &[], Bytes::new())
            .await
    }

    /// Every version and delete marker under `dir` (relative to the
    /// repository prefix; empty = all), in the store's order (by key, newest
    /// first), through every page of ListObjectVersions.
    pub async fn list_versions(&self, dir: &str) -> StorageResult<Vec<ObjectVersion>> {
        let prefix = format!("{}{dir}", self.prefix);
        let mut found = Vec::new();
        let (mut answered, mut pages) = (0usize, 0usize);
        let mut marker: Option<(String, String)> = None;
        loop {
            let mut query = format!("versions=&prefix={}", utf8_percent_encode(&prefix, QUERY));
            if let Some((key, version)) = &marker {
                query.push_str(&format!(
                    "&key-marker={}&version-id-marker={}",
                    utf8_percent_encode(key, QUERY),
                    utf8_percent_encode(version, QUERY)
                ));
            }
            let answer = self.send("GET", None, &query, &[], Bytes::new()).await?;
            if answer.status != 200 {
                return Err(Self::unexpected("GET", &prefix, &answer));
            }
            let page: VersionsPage =
                quick_xml::de::from_str(&String::from_utf8_lossy(&answer.body)).map_err(|e| {
                    StorageError::Remote {
                        op: "GET",
                        key: prefix.clone(),
                        message: format!("unreadable ListObjectVersions answer: {e}"),
                        transient: false,
                    }
                })?;
            let (truncated, next_key, next_version) = (
                page.truncated,
                page.next_key.clone(),
                page.next_version.clone(),
            );
            let refuse = |why: String| StorageError::Remote {
                op: "GET",
                key: prefix.clone(),
                message: why,
                transient: false,
            };
            // Every entry answered counts, kept or not, and a page that says more follow must
            // hold some: otherwise pages of nothing (or of keys not taken) could go on forever.
            let entries = page
                .entries
                .iter()
                .filter(|e| !matches!(e, VersionEntry::Other))
                .count();
            if truncated && entries == 0 {
                return Err(refuse(
                    "a truncated ListObjectVersions page with no versions".into(),
                ));
            }
            answered += entries;
            pages += 1;
            if pages > MAX_VERSION_PAGES {
                return Err(refuse(format!(
                    "ListObjectVersions answers more than {MAX_VERSION_PAGES} pages"
                )));
            }
            found.extend(page_versions(page, &self.prefix)?);
            if answered > MAX_LISTED_VERSIONS {
                return Err(refuse(format!(
                    "ListObjectVersions lists more than {MAX_LISTED_VERSIONS} versions"
                )));
            }
            match (truncated, next_key, next_version) {
                (true, Some(key), Some(version)) => {
                    // Keys come in order: a marker that does not move on would list forever.
                    if let Some((last_key, last_version)) = &marker {
                        if key < *last_key || (key == *last_key && version == *last_version) {
                            return Err(refuse(format!(
                                "a ListObjectVersions page whose next marker {key:?} does not move past {last_key:?}"
                            )));
                        }
                    }
                    marker = Some((key, version))
                }
                (true, _, _) => {
                    return Err(StorageError::Remote {
                        op: "GET",
                        key: prefix,
                        message: "a truncated ListObjectVersions page without its next marker"
                            .into(),
                        transient: false,
                    })
                }
                _ => return Ok(found),
            }
        }
    }
}

/// Most object versions one listing gathers (about a gigabyte of memory): a store answering
/// more under one prefix is refused rather than followed.
const MAX_LISTED_VERSIONS: usize = 10_000_000;
/// Most pages one listing follows: ten times what the versions above need at the 1,000 a page
/// S3 answers, so a store answering a version or two a page is stopped too.
const MAX_VERSION_PAGES: usize = 100_000;

/// The versions and delete markers of one ListObjectVersions page, keys made
/// relative to `prefix`. A key that is not a valid repository key (`..`,
/// empty parts, control characters) cannot be one Strata wrote: it is left
/// out, so nothing the store lists reaches a path or a request unchecked.
fn page_versions(page: VersionsPage, prefix: &str) -> StorageResult<Vec<ObjectVersion>> {
    let mut found = Vec::new();
    for entry in page.entries {
        let (item, delete_marker) = match entry {
            VersionEntry::Version(v) => (v, false),
            VersionEntry::DeleteMarker(v) => (v, true),
            VersionEntry::Other => continue,
        };
        let Some(key) = item.key.strip_prefix(prefix) else {
            continue;
        };
        if super::validate_prefix(key).is_err() || key.is_empty() {
            tracing::warn!(
                "ignoring {:?} in the version listing: not a repository key",
                item.key
            );
            continue;
        }
        let last_modified = DateTime::parse_from_rfc3339(&item.last_modified)
            .map_err(|e| StorageError::Remote {
                op: "GET",
                key: item.key.clone(),
                message: format!("bad LastModified {:?}: {e}", item.last_modified),
                transient: false,
            })?
            .with_timezone(&Utc);
        found.push(ObjectVersion {
            key: key.to_string(),
            version_id: item.version_id,
            last_modified,
            size: item.size.unwrap_or(0),
            delete_marker,
        });
    }
    Ok(found)
}

#[derive(Deserialize)]
struct VersionsPage {
    #[serde(rename = "IsTruncated", default)]
    truncated: bool,
    #[serde(rename = "NextKeyMarker")]
    next_key: Option<String>,
    #[serde(rename = "NextVersionIdMarker")]
    next_version: Option<String>,
    #[serde(rename = "$value", default)]
    entries: Vec<VersionEntry>,
}

#[derive(Deserialize)]
enum VersionEntry {
    Version(VersionItem),
    DeleteMarker(VersionItem),
    #[serde(other)]
    Other,
}

#[derive(Deserialize)]
struct VersionItem {
    #[serde(rename = "Key")]
    key: String,
    #[serde(rename = "VersionId")]
    version_id: String,
    #[serde(rename = "LastModified")]
    last_modified: String,
    #[serde(rename = "Size")]
    size: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_listings_are_read_with_their_delete_markers() {
        let xml = r#"<?xml version="1.0" encoding="UTF-8"?>
<ListVersionsResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">
  <Name>b</Name><Prefix>r/</Prefix><KeyMarker></KeyMarker><VersionIdMarker></VersionIdMarker>
  <MaxKeys>1000</MaxKeys><IsTruncated>true</IsTruncated>
  <NextKeyMarker>r/b</NextKeyMarker><NextVersionIdMarker>v3</NextVersionIdMarker>
  <DeleteMarker><Key>r/a</Key><VersionId>v2</VersionId><IsLatest>true</IsLatest>
    <LastModified>2026-12-06T10:00:01.000Z</LastModified></DeleteMarker>
  <Version><Key>r/a</Key><VersionId>v1</VersionId><IsLatest>false</IsLatest>
    <LastModified>2026-12-06T10:00:00.000Z</LastModified><ETag>"x"</ETag><Size>7</Size>
    <StorageClass>STANDARD</StorageClass></Version>
</ListVersionsResult>"#;
        let page: VersionsPage = quick_xml::de::from_str(xml).unwrap();
        assert!(page.truncated);
        assert_eq!(page.next_version.as_deref(), Some("v3"));
        let kinds: Vec<(bool, &str, Option<u64>)> = page
            .entries
            .iter()
            .filter_map(|e| match e {
                VersionEntry::Version(v) => Some((false, v.version_id.as_str(), v.size)),
                VersionEntry::DeleteMarker(v) => Some((true, v.version_id.as_str(), v.size)),
                VersionEntry::Other => None,
            })
            .collect();
        assert_eq!(kinds, vec![(true, "v2", None), (false, "v1", Some(7))]);
        let versions = page_versions(page, "r/").unwrap();
        assert_eq!(versions.len(), 2);
        assert!(versions.iter().all(|v| v.key == "a"));
    }

    /// A store answering every ListObjectVersions call with `body`; the calls are counted.
    fn answering(body: &'static str) -> (S3Api, std::sync::Arc<std::sync::atomic::AtomicU32>) {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let served = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let count = served.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let mut buf = [0u8; 65536];
                let _ = stream.read(&mut buf);
                let _ = write!(
                    stream,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        let endpoint = format!("http://{addr}");
        let api = S3Api::new(ApiSettings {
            bucket: "b",
            prefix: "r/",
            endpoint: Some(&endpoint),
            region: "us-east-1",
            access_key_id: Some("AKID"),
            secret_access_key: Some("SECRET"),
            session_token: None,
            path_style: true,
            allow_http: true,
            request_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
        })
        .unwrap();
        (api, served)
    }

    /// A store whose truncated pages do not move on, or hold no versions, is refused rather
    /// than followed forever.
    #[tokio::test]
    async fn a_version_listing_that_does_not_move_on_is_refused() {
        let list = |api: S3Api| async move {
            tokio::time::timeout(Duration::from_secs(30), api.list_versions(""))
                .await
                .expect("the listing ends")
                .unwrap_err()
                .to_string()
        };
        let (api, served) = answering(
            r#"<ListVersionsResult><IsTruncated>true</IsTruncated>
<NextKeyMarker>r/a</NextKeyMarker><NextVersionIdMarker>v1</NextVersionIdMarker>
<Version><Key>r/a</Key><VersionId>v1</VersionId>
<LastModified>2026-12-06T10:00:00.000Z</LastModified><Size>7</Size></Version>
</ListVersionsResult>"#,
        );
        let err = list(api).await;
        assert!(err.contains("does not move past"), "{err}");
        assert_eq!(served.load(std::sync::atomic::Ordering::SeqCst), 2);
        let (api, served) = answering(
            r#"<ListVersionsResult><Name>b</Name><IsTruncated>true</IsTruncated>
<NextKeyMarker>r/z</NextKeyMarker><NextVersionIdMarker>v1</NextVersionIdMarker>
</ListVersionsResult>"#,
        );
        let err = list(api).await;
        assert!(
            err.contains("truncated ListObjectVersions page with no versions"),
            "{err}"
        );
        assert_eq!(served.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    fn one_version(key: &str, modified: &str) -> VersionsPage {
        let xml = format!(
            r#"<ListVersionsResult><IsTruncated>false</IsTruncated>
  <Version><Key>{key}</Key><VersionId>v1</VersionId>
    <LastModified>{modified}</LastModified><Size>7</Size></Version>
</ListVersionsResult>"#
        );
        quick_xml::de::from_str(&xml).unwrap()
    }

    #[test]
    fn hostile_keys_and_dates_in_a_version_listing_are_not_taken() {
        let when = "2026-12-06T10:00:00.000Z";
        let long = format!("r/packs/{}", "x".repeat(2000));
        for key in [
            "r/../x",
            "r/packs/../../etc/passwd",
            "r/a&#10;b",
            "r/a&#9;b",
            "r//a",
            "r/./a",
            "r/",
            "other/a",
        ] {
            let versions = page_versions(one_version(key, when), "r/").unwrap();
            assert!(versions.is_empty(), "{key:?} taken: {versions:?}");
        }
        // Quotes, `=` and long names are data: kept as they are.
        for key in ["r/a\"b'c", "r/a=b", long.as_str()] {
            let versions = page_versions(one_version(key, when), "r/").unwrap();
            assert_eq!(versions.len(), 1, "{key:?}");
            assert_eq!(versions[0].key, key.strip_prefix("r/").unwrap());
        }
        for bad_date in ["yesterday", "", "2026-13-40T99:00:00Z"] {
            let err = page_versions(one_version("r/a", bad_date), "r/").unwrap_err();
            assert!(err.to_string().contains("bad LastModified"), "{err}");
        }
    }
}
