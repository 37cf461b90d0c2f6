//! A repository in Azure Blob Storage (or Azurite, its emulator), through the
//! `object_store` crate's Microsoft Azure client: Shared Key signing,
//! Microsoft Entra credentials and the REST protocol are its job. Requests,
//! uploads, listing and error classification are shared with the other
//! object stores in [`super::cloud`].
//!
//! Atomicity: a blob becomes visible only when a single Put Blob or the Put
//! Block List that commits its uncommitted blocks succeeds (Azure Storage REST
//! reference, "Put Block List"), so a reader never sees a partial object.
//! Blocks never committed are discarded by the service after a week.
//!
//! The emulator is reached path-style, `http://host:port/<account>/<container>/<blob>`,
//! with its well-known development account unless another one is given.
//! The account key is never printed: `Debug` leaves it out.

use object_store::azure::MicrosoftAzureBuilder;

use super::cloud::{checked_endpoint, split_url, ObjectStorage, Tuning};
use super::{StorageError, StorageResult};

/// The account every Azurite serves (Microsoft's "Use the Azurite emulator",
/// well-known storage account and key).
pub const EMULATOR_ACCOUNT: &str = "devstoreaccount1";

/// The public key of [`EMULATOR_ACCOUNT`]; not a secret.
pub const EMULATOR_ACCOUNT_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// Where Azurite listens unless told otherwise.
pub const EMULATOR_BLOB_URL: &str = "http://127.0.0.1:10000";

/// Where and how to reach the container.
#[derive(Clone, PartialEq, Eq)]
pub struct AzureConfig {
    /// Storage account name (default with `use_emulator`: [`EMULATOR_ACCOUNT`]).
    pub account: Option<String>,
    /// Container name.
    pub container: String,
    /// Blob name prefix inside the container (no leading or trailing `/`; may be empty).
    pub prefix: String,
    /// Shared Key of the account; when absent, the `AZURE_*` environment
    /// (service principal, workload identity) and then the machine's managed
    /// identity are used, as the Azure SDKs do.
    pub access_key: Option<String>,
    /// Blob service URL: `https://<account>.blob.core.windows.net` by
    /// default, another for sovereign clouds or private endpoints. With
    /// `use_emulator`, the emulator's base URL (default [`EMULATOR_BLOB_URL`]).
    pub endpoint: Option<String>,
    /// Talk to Azurite: path-style URLs, plain http, the development
    /// account and key unless others are given.
    pub use_emulator: bool,
    /// Block sizes, concurrency and deadlines.
    pub tuning: Tuning,
}

impl std::fmt::Debug for AzureConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AzureConfig")
            .field("account", &self.account)
            .field("container", &self.container)
            .field("prefix", &self.prefix)
            .field("endpoint", &self.endpoint)
            .field("use_emulator", &self.use_emulator)
            .field("tuning", &self.tuning)
            .finish_non_exhaustive()
    }
}

impl AzureConfig {
    /// Parses `azure://container[/prefix]`; every other setting takes its default.
    pub fn from_url(url: &str) -> StorageResult<Self> {
        let (container, prefix) =
            split_url(url, "azure://", "an azure://container/prefix URL", "blob")?;
        // Azure's container naming rules: 3-63 lower-case letters, digits and
        // single hyphens, starting and ending with a letter or digit.
        let valid_container = (3..=63).contains(&container.len())
            && container
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            && !container.starts_with('-')
            && !container.ends_with('-')
            && !container.contains("--");
        if !valid_container {
            return Err(StorageError::Config(format!(
                "{container:?} is not a valid container name (3-63 lower-case letters, digits or single '-')"
            )));
        }
        Ok(AzureConfig {
            account: None,
            container: container.to_string(),
            prefix,
            access_key: None,
            endpoint: None,
            use_emulator: false,
            tuning: Tuning::default(),
        })
    }

    fn url(&self) -> String {
        if self.prefix.is_empty() {
            format!("azure://{}", self.container)
        } else {
            format!("azure://{}/{}", self.container, self.prefix)
        }
    }

    /// The account requests are made for.
    fn account_name(&self) -> StorageResult<String> {
        match (&self.account, self.use_emulator) {
            (Some(account), _) => {
                // Azure account names: 3-24 lower-case letters and digits.
                let valid = (3..=24).contains(&account.len())
                    && account
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
                if !valid {
                    return Err(StorageError::Config(format!(
                        "{account:?} is not a valid storage account name (3-24 lower-case letters or digits)"
                    )));
                }
                Ok(account.clone())
            }
            (None, true) => Ok(EMULATOR_ACCOUNT.to_string()),
            (None, false) => Err(StorageError::Config(format!(
                "{}: the storage account is required",
                self.url()
            ))),
        }
    }
}

/// A repository in an Azure Blob Storage container (under a blob prefix).
pub struct AzureStorage {
    inner: ObjectStorage,
    config: AzureConfig,
}

impl std::fmt::Debug for AzureStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AzureStorage")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl AzureStorage {
    /// Sets up the client; no request is made until the first call.
    pub fn new(config: AzureConfig) -> StorageResult<Self> {
        let tuning = config.tuning;
        tuning.check()?;
        let account = config.account_name()?;
        let mut builder = MicrosoftAzureBuilder::from_env()
            .with_account(&account)
            .with_container_name(&config.container)
            .with_retry(Tuning::retry_config());
        let configured = config
            .endpoint
            .as_deref()
            .map(|e| checked_endpoint(e, config.use_emulator))
            .transpose()?;
        let endpoint = if config.use_emulator {
            // The account is the first path segment of every emulator URL;
            // object_store's own emulator switch reads the URL from the
            // process environment, which a service of many repositories
            // cannot share, so the URL is built here.
            let base = configured.as_deref().unwrap_or(EMULATOR_BLOB_URL);
            let key = config.access_key.as_deref().unwrap_or(EMULATOR_ACCOUNT_KEY);
            builder = builder.with_access_key(key);
            Some(format!("{base}/{account}"))
        } else {
            if let Some(key) = &config.access_key {
                builder = builder.with_access_key(key);
            }
            configured
        };
        if let Some(endpoint) = &endpoint {
            builder = builder.with_endpoint(endpoint.clone());
        }
        let allow_http = config.use_emulator;
        builder = builder
            .with_allow_http(allow_http)
            .with_client_options(tuning.client_options(allow_http));
        let azure = builder
            .build()
            .map_err(|e| StorageError::Config(format!("{}: {e}", config.url())))?;
        let description = match &endpoint {
            Some(endpoint) => format!("{} at {endpoint}", config.url()),
            None => format!("{} in account {account}", config.url()),
        };
        let inner = ObjectStorage::new("azure", azure, &config.prefix, tuning, description)?;
        Ok(AzureStorage { inner, config })
    }

    /// The configuration the store was made with.
    pub fn config(&self) -> &AzureConfig {
        &self.config
    }
}

super::cloud::forward_storage!(AzureStorage);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::Storage;

    #[test]
    fn urls_and_settings_are_checked() {
        let c = AzureConfig::from_url("azure://backups/a/b/").unwrap();
        assert_eq!(
            (c.container.as_str(), c.prefix.as_str()),
            ("backups", "a/b")
        );
        assert_eq!(AzureConfig::from_url("azure://backups").unwrap().prefix, "");
        for bad in [
            "s3://backups",
            "azure://Backups",
            "azure://ab",
            "azure://-backups",
            "azure://back--ups",
            "azure://backups/a/../b",
        ] {
            assert!(AzureConfig::from_url(bad).is_err(), "{bad}");
        }
        // A real service needs its account; the emulator has one.
        assert!(matches!(
            AzureStorage::new(c.clone()),
            Err(StorageError::Config(_))
        ));
        let mut bad_account = c.clone();
        bad_account.account = Some("My_Account".into());
        assert!(AzureStorage::new(bad_account).is_err());
        let mut emulator = c.clone();
        emulator.use_emulator = true;
        emulator.endpoint = Some("http://127.0.0.1:1/".into());
        let s = AzureStorage::new(emulator).unwrap();
        assert_eq!(
            s.describe(),
            "azure://backups/a/b at http://127.0.0.1:1/devstoreaccount1"
        );
        let mut small = c;
        small.use_emulator = true;
        small.tuning.part_size = 1024;
        assert!(matches!(
            AzureStorage::new(small),
            Err(StorageError::Config(_))
        ));
    }

    #[test]
    fn hostile_container_account_prefix_and_endpoint_values_are_refused() {
        for container in [
            "",
            "ab",
            "Backups",
            "back_ups",
            "back.ups",
            "back ups",
            "back\nups",
            "back\rups",
            "back\u{0}ups",
            "bäckups",
            "..",
            "%2e%2e",
            "$root",
            "-backups",
            "backups-",
            "back--ups",
            "backups?comp=list",
            "backups#x",
            &"a".repeat(64),
        ] {
            let url = format!("azure://{container}/p");
            assert!(AzureConfig::from_url(&url).is_err(), "{container:?}");
        }
        for prefix in [
            "a/../b", "..", "./a", "a//b", "a\nb", "a\rb", "a\u{7f}b", "a\u{0}b",
        ] {
            let url = format!("azure://backups/{prefix}");
            assert!(AzureConfig::from_url(&url).is_err(), "{prefix:?}");
        }
        let base = AzureConfig::from_url("azure://backups").unwrap();
        for account in [
            "ab",
            "Account",
            "acc-ount",
            "acc_ount",
            "evil.example.com",
            "acct/../other",
            "acct#",
            "acct?x=1",
            "acct@evil",
            "acct\n",
            "acct\u{0}",
            "äccount",
            &"a".repeat(25),
        ] {
            for use_emulator in [false, true] {
                let mut c = base.clone();
                c.account = Some(account.to_string());
                c.use_emulator = use_emulator;
                c.endpoint = Some("https://blob.example".into());
                match AzureStorage::new(c) {
                    Err(StorageError::Config(m)) => {
                        assert!(m.contains("not a valid storage account name"), "{m}")
                    }
                    other => panic!("account {account:?} accepted: {other:?}"),
                }
            }
        }
        for endpoint in [
            "ftp://blob.example",
            "https://",
            "https://blob.example/\r\nX-Injected: 1",
            "https://blob.example?sig=1",
            "https://user@blob.example",
            "blob.example",
        ] {
            let mut c = base.clone();
            c.account = Some("acct".into());
            c.endpoint = Some(endpoint.into());
            assert!(
                matches!(AzureStorage::new(c), Err(StorageError::Config(_))),
                "{endpoint:?}"
            );
        }
        // Plain http only for the emulator.
        let mut plain = base.clone();
        plain.account = Some("acct".into());
        plain.endpoint = Some("http://blob.example".into());
        assert!(AzureStorage::new(plain.clone()).is_err());
        plain.use_emulator = true;
        assert!(AzureStorage::new(plain).is_ok());
    }

    #[test]
    fn the_access_key_is_never_printed() {
        let mut c = AzureConfig::from_url("azure://backups").unwrap();
        c.account = Some("acct".into());
        c.access_key = Some("c2VjcmV0LWtleS1ieXRlcw==".into());
        let s = AzureStorage::new(c).unwrap();
        let shown = format!("{s:?} {:?} {}", s.config(), s.describe());
        assert!(!shown.contains("c2VjcmV0"), "{shown}");
    }

    #[test]
    fn an_unreachable_emulator_is_transient() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut c = AzureConfig::from_url("azure://backups").unwrap();
        c.use_emulator = true;
        c.endpoint = Some(format!("http://127.0.0.1:{port}"));
        let err = AzureStorage::new(c).unwrap().exists("a").unwrap_err();
        assert!(err.is_transient(), "{err}");
    }
}
