//! A repository in Google Cloud Storage (or an emulator such as
//! fake-gcs-server), through the `object_store` crate's GCS client: OAuth
//! tokens from a service account key, application default credentials or
//! the metadata server, and the XML API are its job. Requests, uploads,
//! listing and error classification are shared with the other object stores
//! in [`super::cloud`].
//!
//! Atomicity: an object becomes visible only when a single upload or the
//! XML API's CompleteMultipartUpload succeeds (Cloud Storage documentation,
//! "XML API multipart uploads"), so a reader never sees a partial object.
//!
//! `object_store` takes another service URL only from a service account key
//! (its `gcs_base_url` field), so an endpoint is written into the key here;
//! an emulator gets a key that turns OAuth off. The key is never printed:
//! `Debug` leaves it out.

use object_store::gcp::GoogleCloudStorageBuilder;

use super::cloud::{checked_endpoint, split_url, ObjectStorage, Tuning};
use super::{StorageError, StorageResult};

/// Where an emulator listens unless told otherwise (fake-gcs-server's port).
pub const EMULATOR_URL: &str = "http://127.0.0.1:4443";

/// Where and how to reach the bucket.
#[derive(Clone, PartialEq, Eq)]
pub struct GcsConfig {
    /// Bucket name.
    pub bucket: String,
    /// Object name prefix inside the bucket (no leading or trailing `/`; may be empty).
    pub prefix: String,
    /// A service account key (the JSON file's text); when absent, the
    /// `GOOGLE_*` environment, application default credentials and then the
    /// metadata server are used, as Google's client libraries do.
    pub service_account_key: Option<String>,
    /// Service URL: `https://storage.googleapis.com` by default, another
    /// for private endpoints (needs `service_account_key`). With
    /// `use_emulator`, the emulator's URL (default [`EMULATOR_URL`]).
    pub endpoint: Option<String>,
    /// Talk to an emulator: no credentials, plain http allowed.
    pub use_emulator: bool,
    /// Part sizes, concurrency and deadlines.
    pub tuning: Tuning,
}

impl std::fmt::Debug for GcsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GcsConfig")
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field(
                "service_account_key",
                &self.service_account_key.as_ref().map(|_| "<hidden>"),
            )
            .field("endpoint", &self.endpoint)
            .field("use_emulator", &self.use_emulator)
            .field("tuning", &self.tuning)
            .finish()
    }
}

impl GcsConfig {
    /// Parses `gs://bucket[/prefix]`; every other setting takes its default.
    pub fn from_url(url: &str) -> StorageResult<Self> {
        let (bucket, prefix) = split_url(url, "gs://", "a gs://bucket/prefix URL", "object")?;
        if !valid_bucket_name(bucket) {
            return Err(StorageError::Config(format!(
                "{bucket:?} is not a valid bucket name (3-63 lower-case letters, digits, '-', '_', \
                 dot-separated parts of at most 63 up to 222 in all, starting and ending with a \
                 letter or digit, neither \"goog\" first nor \"google\" inside)"
            )));
        }
        Ok(GcsConfig {
            bucket: bucket.to_string(),
            prefix,
            service_account_key: None,
            endpoint: None,
            use_emulator: false,
            tuning: Tuning::default(),
        })
    }

    fn url(&self) -> String {
        if self.prefix.is_empty() {
            format!("gs://{}", self.bucket)
        } else {
            format!("gs://{}/{}", self.bucket, self.prefix)
        }
    }

    /// The service account key `object_store` is given: the configured one
    /// with the endpoint written in, or for an emulator one that turns
    /// OAuth off. `None`: the environment's credentials.
    fn builder_key(&self) -> StorageResult<Option<String>> {
        let endpoint = match &self.endpoint {
            Some(endpoint) => Some(checked_endpoint(endpoint, self.use_emulator)?),
            None if self.use_emulator => Some(EMULATOR_URL.to_string()),
            None => None,
        };
        if self.use_emulator {
            if self.service_account_key.is_some() {
                return Err(StorageError::Config(format!(
                    "{}: an emulator is reached without credentials; drop the service account key",
                    self.url()
                )));
            }
            let key = serde_json::json!({
                "private_key": "",
                "private_key_id": "",
                "client_email": "",
                "disable_oauth": true,
                "gcs_base_url": endpoint,
            });
            return Ok(Some(key.to_string()));
        }
        let Some(text) = &self.service_account_key else {
            if endpoint.is_some() {
                return Err(StorageError::Config(format!(
                    "{}: another endpoint needs a service account key",
                    self.url()
                )));
            }
            return Ok(None);
        };
        // Parse errors name a line and column, never the key's text.
        let parsed: serde_json::Value = serde_json::from_str(text).map_err(|e| {
            StorageError::Config(format!(
                "{}: the service account key is not JSON (line {}, column {})",
                self.url(),
                e.line(),
                e.column()
            ))
        })?;
        let serde_json::Value::Object(mut key) = parsed else {
            return Err(StorageError::Config(format!(
                "{}: the service account key is not a JSON object",
                self.url()
            )));
        };
        for field in ["private_key", "client_email"] {
            if !key.get(field).is_some_and(serde_json::Value::is_string) {
                return Err(StorageError::Config(format!(
                    "{}: the service account key has no {field} (is it a service account's JSON key?)",
                    self.url()
                )));
            }
        }
        // These would send requests elsewhere or unauthenticated, around the
        // endpoint checks: only `endpoint`/`use_emulator` decide that.
        for field in ["gcs_base_url", "disable_oauth"] {
            if key.contains_key(field) {
                return Err(StorageError::Config(format!(
                    "{}: the service account key sets {field}; use the [gcs] endpoint setting instead",
                    self.url()
                )));
            }
        }
        // object_store insists on this field, which only names the key.
        key.entry("private_key_id")
            .or_insert_with(|| serde_json::Value::String(String::new()));
        if let Some(endpoint) = endpoint {
            key.insert("gcs_base_url".into(), serde_json::Value::String(endpoint));
        }
        Ok(Some(serde_json::Value::Object(key).to_string()))
    }
}

/// Cloud Storage's bucket naming rules ("Bucket names" in its documentation):
/// lower-case letters, digits, `-`, `_` and `.`; 3-63 characters, or up to
/// 222 when dotted with no part longer than 63; starting and ending with a
/// letter or digit; no IPv4 address; not starting with `goog` nor containing
/// `google`.
fn valid_bucket_name(name: &str) -> bool {
    let max = if name.contains('.') { 222 } else { 63 };
    let alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    (3..=max).contains(&name.len())
        && name
            .chars()
            .all(|c| alnum(c) || c == '-' || c == '_' || c == '.')
        && name.starts_with(alnum)
        && name.ends_with(alnum)
        && name.split('.').all(|part| (1..=63).contains(&part.len()))
        && name.parse::<std::net::Ipv4Addr>().is_err()
        && !name.starts_with("goog")
        && !name.contains("google")
        && !name.contains("g00gle")
}

/// A repository in a Google Cloud Storage bucket (under an object prefix).
pub struct GcsStorage {
    inner: ObjectStorage,
    config: GcsConfig,
}

impl std::fmt::Debug for GcsStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GcsStorage")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl GcsStorage {
    /// Sets up the client; no request is made until the first call (a
    /// service account's token is fetched then).
    pub fn new(config: GcsConfig) -> StorageResult<Self> {
        let tuning = config.tuning;
        tuning.check()?;
        let allow_http = config.use_emulator;
        // A key from the configuration is the only credential; without one
        // the `GOOGLE_*` environment is read (a key path there would
        // otherwise clash with the configured key).
        let builder = match config.builder_key()? {
            Some(key) => GoogleCloudStorageBuilder::new().with_service_account_key(key),
            None => GoogleCloudStorageBuilder::from_env(),
        };
        let builder = builder
            .with_bucket_name(&config.bucket)
            .with_retry(Tuning::retry_config())
            .with_client_options(tuning.client_options(allow_http));
        // object_store's messages about credentials name no key material.
        let gcs = builder
            .build()
            .map_err(|e| StorageError::Config(format!("{}: {e}", config.url())))?;
        let description = match (&config.endpoint, config.use_emulator) {
            (Some(endpoint), _) => {
                format!("{} at {}", config.url(), endpoint.trim_end_matches('/'))
            }
            (None, true) => format!("{} at {EMULATOR_URL}", config.url()),
            (None, false) => config.url(),
        };
        let inner = ObjectStorage::new("gcs", gcs, &config.prefix, tuning, description)?;
        Ok(GcsStorage { inner, config })
    }

    /// The configuration the store was made with.
    pub fn config(&self) -> &GcsConfig {
        &self.config
    }
}

super::cloud::forward_storage!(GcsStorage);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::Storage;

    #[test]
    fn urls_and_bucket_names_are_checked() {
        let c = GcsConfig::from_url("gs://my_backups.example-1/a/b/").unwrap();
        assert_eq!(
            (c.bucket.as_str(), c.prefix.as_str()),
            ("my_backups.example-1", "a/b")
        );
        assert_eq!(GcsConfig::from_url("gs://backups").unwrap().prefix, "");
        let long_dotted = format!("{}.{}.{}", "a".repeat(63), "b".repeat(63), "c".repeat(63));
        assert!(GcsConfig::from_url(&format!("gs://{long_dotted}")).is_ok());
        for bad in [
            "s3://backups".to_string(),
            "gs://".into(),
            "gs://ab".into(),
            "gs://Backups".into(),
            "gs://-backups".into(),
            "gs://backups-".into(),
            "gs://_backups".into(),
            "gs://back..ups".into(),
            "gs://.backups".into(),
            "gs://back ups".into(),
            "gs://back\nups".into(),
            "gs://back\u{0}ups".into(),
            "gs://bäckups".into(),
            "gs://192.168.5.4".into(),
            "gs://goog-backups".into(),
            "gs://my-google-backups".into(),
            "gs://my-g00gle-backups".into(),
            format!("gs://{}", "a".repeat(64)),
            format!("gs://{}.b", "a".repeat(64)),
            format!("gs://{long_dotted}.{}", "d".repeat(40)),
            "gs://backups/a/../b".into(),
            "gs://backups/../etc".into(),
            "gs://backups/a/./b".into(),
            "gs://backups/a\nb".into(),
            "gs://backups/a\u{7}b".into(),
            "gs://backups/a//b".into(),
        ] {
            assert!(GcsConfig::from_url(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn endpoints_and_keys_are_checked() {
        let base = GcsConfig::from_url("gs://backups/p").unwrap();
        let mut emulator = base.clone();
        emulator.use_emulator = true;
        let s = GcsStorage::new(emulator.clone()).unwrap();
        assert_eq!(s.describe(), "gs://backups/p at http://127.0.0.1:4443");
        emulator.endpoint = Some("http://127.0.0.1:1/".into());
        let s = GcsStorage::new(emulator.clone()).unwrap();
        assert_eq!(s.describe(), "gs://backups/p at http://127.0.0.1:1");
        for bad in [
            "ftp://127.0.0.1:1",
            "http://",
            "http://host/\r\nX-Injected: 1",
            "http://host:1?x=1",
            "http://user@host",
            "http://host name",
        ] {
            let mut c = emulator.clone();
            c.endpoint = Some(bad.into());
            assert!(
                matches!(GcsStorage::new(c), Err(StorageError::Config(_))),
                "{bad:?}"
            );
        }
        // Plain http is for emulators only; another endpoint needs a key.
        let mut plain = base.clone();
        plain.endpoint = Some("http://10.0.0.1:4443".into());
        assert!(GcsStorage::new(plain).is_err());
        let mut keyless = base.clone();
        keyless.endpoint = Some("https://storage.internal.example".into());
        assert!(GcsStorage::new(keyless).is_err());
        // An emulator with a key is a mistake worth saying.
        let mut both = emulator;
        both.service_account_key = Some("{}".into());
        assert!(GcsStorage::new(both).is_err());
    }

    #[test]
    fn the_service_account_key_is_never_printed() {
        let secret =
            "-----BEGIN PRIVATE KEY-----\\nc2VjcmV0LWtleS1ieXRlcw==\\n-----END PRIVATE KEY-----\\n";
        let mut c = GcsConfig::from_url("gs://backups").unwrap();
        c.service_account_key = Some(format!(
            "{{\"type\": \"service_account\", \"private_key\": \"{secret}\", \
             \"client_email\": \"strata@example.iam.gserviceaccount.com\"}}"
        ));
        c.endpoint = Some("https://storage.internal.example".into());
        // The key does not hold a usable RSA key: refused without echoing it.
        let shown = match GcsStorage::new(c.clone()) {
            Ok(s) => format!("{s:?} {:?} {}", s.config(), s.describe()),
            Err(e) => format!("{e} {e:?} {c:?}"),
        };
        assert!(!shown.contains("c2VjcmV0"), "{shown}");
        // Text that is not a key: refused, still without echoing it.
        for text in [
            "c2VjcmV0 not json",
            "[\"c2VjcmV0\"]",
            "{\"private_key\": \"c2VjcmV0\"}",
        ] {
            c.service_account_key = Some(text.into());
            let err = GcsStorage::new(c.clone()).unwrap_err();
            let shown = format!("{err} {err:?} {c:?}");
            assert!(!shown.contains("c2VjcmV0"), "{shown}");
        }
    }

    #[test]
    fn a_key_file_cannot_move_or_unauthenticate_the_requests() {
        let mut c = GcsConfig::from_url("gs://backups").unwrap();
        for extra in [
            "\"gcs_base_url\": \"https://elsewhere.example\"",
            "\"gcs_base_url\": \"http://127.0.0.1:1/\\r\\nHost: x\"",
            "\"disable_oauth\": true",
        ] {
            c.service_account_key = Some(format!(
                "{{\"private_key\": \"k\", \"client_email\": \"s@example.com\", {extra}}}"
            ));
            let err = GcsStorage::new(c.clone()).unwrap_err();
            assert!(
                matches!(&err, StorageError::Config(m) if m.contains("the service account key sets")),
                "{extra}: {err}"
            );
        }
    }

    #[test]
    fn an_unreachable_emulator_is_transient() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut c = GcsConfig::from_url("gs://backups").unwrap();
        c.use_emulator = true;
        c.endpoint = Some(format!("http://127.0.0.1:{port}"));
        let err = GcsStorage::new(c).unwrap().exists("a").unwrap_err();
        assert!(err.is_transient(), "{err}");
    }
}
