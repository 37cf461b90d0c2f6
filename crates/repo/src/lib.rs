//! Strata's repository: the self-describing store of backups and WAL.
//!
//! Data files are cut into fixed-size blocks, each addressed by a keyed BLAKE3
//! hash of its contents, compressed with zstd, optionally encrypted, and
//! stored once in a pack. A backup set is a manifest listing files as block
//! references; WAL segments and timeline histories are sealed objects of their
//! own. The format is versioned and specified in docs/REPOSITORY.md; this
//! crate is its only writer.

#![warn(missing_docs)]

pub mod crypto;
mod gc;
mod index;
mod key_record;
pub mod manifest;
pub mod object;
pub mod pack;

pub use strata_ids::{BackupId, InstanceId, JobId, PackId};
pub mod paths;
pub mod storage;
mod usage;
mod verify;
mod wal;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use thiserror::Error;

pub use crypto::{EncryptionConfig, KeyDomain, KeySource, Keys};
pub use gc::{GcReport, PendingPacks};
pub use index::{index_prefix, AddedBlocks, BlockIndex, IndexRebuild, INDEX_RUN_VERSION};
pub use key_record::{key_record_key, InstanceKeyRecord, KEY_RECORD_VERSION};
pub use manifest::{
    BackupContents, BackupManifest, BackupStats, DatabaseContents, FileEntry, FileKind,
    TableContents, TablespaceEntry,
};
pub use object::ObjectKind;
pub use storage::{
    AzureConfig, AzureStorage, GcsConfig, GcsStorage, LocalStorage, LockMode, MemoryStorage,
    MinFreeSpace, ObjectLock, ObjectSize, RetryPolicy, RetryingStorage, S3Config, S3Storage,
    Storage, StorageError, Tuning,
};
pub use usage::{InstanceUsage, RepositoryUsage, UsageCache};
pub use verify::{VerifyProblem, VerifyReport};
pub use wal::{
    history_key, wal_segment_key, RecoveryEventInfo, RecoveryEventKind, RestorePointInfo,
    WalObject, WalPayload, WalSegmentMeta,
};

use object::{open, seal};
use pack::{encode_blob, PackBuilder, PackEntry};

/// The highest repository format version this build reads. Unencrypted
/// repositories are written as version 1 (unchanged, so older builds still
/// open them), encrypted ones as version 2.
/// zstd level for new blocks and objects unless configured otherwise: fast,
/// and backups are usually limited by compression speed.
pub const DEFAULT_COMPRESS_LEVEL: i32 = 1;

/// The newest repository format this build reads; a newer one is refused.
pub const FORMAT_VERSION: u32 = 2;
/// Format version of a plain (unencrypted) repository.
pub const FORMAT_VERSION_PLAIN: u32 = 1;
/// Format version of an encrypted repository.
pub const FORMAT_VERSION_ENCRYPTED: u32 = 2;
/// Key of the repository's configuration object.
pub const CONFIG_KEY: &str = "strata-repo.json";
/// Block size of new repositories: files are cut into blocks of this size.
pub const DEFAULT_BLOCK_SIZE: u32 = 128 * 1024;
/// The largest `block_size` a repository may have.
pub const MAX_BLOCK_SIZE: u32 = 16 * 1024 * 1024;
/// Size at which a pack being written is closed and stored.
pub const DEFAULT_PACK_SIZE: usize = 16 * 1024 * 1024;

/// What a repository operation can fail with.
#[derive(Debug, Error)]
pub enum RepoError {
    /// The store underneath failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// An object does not read back as written (bad checksum, tag, or contents).
    #[error("{object} is corrupt: {reason}")]
    Corrupt {
        /// Key of the object.
        object: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The repository was written by a newer Strata.
    #[error(
        "the repository was written by a newer Strata (format version {found}); this build supports up to version {supported}"
    )]
    NewerFormat {
        /// The repository's format version.
        found: u32,
        /// The newest this build reads.
        supported: u32,
    },
    /// The store holds no repository configuration.
    #[error("no Strata repository at {0}")]
    NotARepository(String),
    /// No manifest for that backup set.
    #[error("backup set {0} not found")]
    BackupNotFound(String),
    /// An object could not be encoded or decoded.
    #[error("repository format error: {0}")]
    Format(String),
    /// A manifest names an entry a restore must not write (an absolute or
    /// `..` path, a link outside `pg_tblspc/`, …): forged or damaged.
    #[error("{object} is refused: {source}")]
    UnsafeEntry {
        /// Key of the manifest.
        object: String,
        /// Which entry and why.
        #[source]
        source: paths::EntryError,
    },
    /// The configured key is not the repository's (or the repository's key
    /// was rotated); nothing was decrypted.
    #[error("the {what} does not unlock repository {repository} (wrong key or passphrase, or the key was rotated)")]
    WrongKey {
        /// Which key was tried (key file, passphrase).
        what: String,
        /// Repository id.
        repository: String,
    },
    /// A key is missing, unreadable, or configured where none belongs.
    #[error("{0}")]
    KeyRequired(String),
    /// An object or pack is sealed under an instance key domain whose key
    /// this reader does not hold (the instance's KMS key was not unwrapped).
    #[error(
        "{object} is sealed under instance key domain {domain}, whose key is not unlocked here"
    )]
    DomainLocked {
        /// Key of the object.
        object: String,
        /// The domain its header names.
        domain: crypto::KeyDomain,
    },
    /// The local cache of the block index cannot be used.
    #[error("block index cache {0}")]
    Cache(String),
}

impl RepoError {
    /// True when retrying may succeed (a transient storage failure).
    pub fn is_transient(&self) -> bool {
        matches!(self, RepoError::Storage(e) if e.is_transient())
    }
}

/// What repository operations return.
pub type RepoResult<T> = Result<T, RepoError>;

/// Keyed BLAKE3: the key is per repository, so block addresses reveal nothing
/// about contents to someone who can only list the store.
#[derive(Clone)]
pub struct Hasher {
    key: [u8; 32],
}

impl std::fmt::Debug for Hasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Hasher(..)")
    }
}

impl Hasher {
    /// A hasher with the repository's hash key.
    pub fn new(key: [u8; 32]) -> Self {
        Hasher { key }
    }

    /// The block's address: keyed BLAKE3 of its raw bytes.
    pub fn hash(&self, data: &[u8]) -> BlockHash {
        BlockHash(*blake3::keyed_hash(&self.key, data).as_bytes())
    }

    /// The same keyed hash, fed piece by piece.
    fn incremental(&self) -> blake3::Hasher {
        blake3::Hasher::new_keyed(&self.key)
    }
}

/// A block's address (keyed BLAKE3 of its raw bytes).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockHash(pub [u8; 32]);

impl std::fmt::Debug for BlockHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", hex::encode(self.0))
    }
}

impl std::fmt::Display for BlockHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", hex::encode(self.0))
    }
}

impl Serialize for BlockHash {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(self.0))
    }
}

impl<'de> Deserialize<'de> for BlockHash {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let mut out = [0u8; 32];
        hex::decode_to_slice(&s, &mut out).map_err(serde::de::Error::custom)?;
        Ok(BlockHash(out))
    }
}

/// Where one block of a file lives. Manifests spell the fields with one
/// letter (`h`, `p`, `o`, `s`, `r`, `c`, see docs/REPOSITORY.md) to stay
/// small; the renames keep that format.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockRef {
    /// Keyed hash of the raw block.
    #[serde(rename = "h")]
    pub hash: BlockHash,
    /// Id of the pack holding the block (`packs/<2 hex>/<id>.pack`).
    #[serde(rename = "p")]
    pub pack: PackId,
    /// Offset of the stored bytes in the pack, after the blob header.
    #[serde(rename = "o")]
    pub offset: u64,
    /// Length of the stored (compressed, encrypted) bytes.
    #[serde(rename = "s")]
    pub stored_len: u32,
    /// Length of the block before compression.
    #[serde(rename = "r")]
    pub raw_len: u32,
    /// Compression of the stored bytes: 0 none, 1 zstd.
    #[serde(rename = "c")]
    pub compression: u8,
}

/// The repository's own configuration object (`strata-repo.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RepoConfig {
    /// Repository format version (see [`FORMAT_VERSION`]).
    pub format_version: u32,
    /// Random id, distinct for every repository.
    pub repository_id: String,
    /// When the repository was created.
    pub created_at: DateTime<Utc>,
    /// Block size in bytes.
    pub block_size: u32,
    /// Hash of block addresses (`blake3-keyed`).
    pub hash: String,
    /// Hex; empty in encrypted repositories, whose hash key is derived from
    /// the wrapped data key instead of being stored in the clear.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub hash_key: String,
    /// Compression of blocks and objects (`zstd`).
    pub compression: String,
    /// Present when the repository is encrypted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<EncryptionConfig>,
}

/// What the repository remembers of a registered instance, so a catalog can be
/// rebuilt from the repository alone. Never holds a password.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct InstanceRecord {
    /// Instance id.
    pub id: InstanceId,
    /// Host name or address.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Role to log in as.
    pub user: String,
    /// Database for SQL, if not the default.
    pub dbname: Option<String>,
    /// TLS mode, as libpq spells it.
    pub sslmode: String,
    /// Environment variable holding the password (the password itself is never stored).
    pub password_env: Option<String>,
    /// When the instance was registered.
    pub created_at: DateTime<Utc>,
}

/// A repository: its configuration, keys and store. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Repository {
    storage: Arc<dyn Storage>,
    config: RepoConfig,
    keys: Arc<Keys>,
    compress_level: i32,
    /// Where decoded block index runs are cached (see `index`).
    index_cache: Option<Arc<std::path::PathBuf>>,
}

impl Repository {
    /// Opens the unencrypted repository in `storage`, creating it when the
    /// store is empty.
    pub fn open_or_init(storage: Arc<dyn Storage>) -> RepoResult<Self> {
        Self::open_or_init_with_key(storage, None)
    }

    /// Opens the repository in `storage` with `key` (required for an
    /// encrypted repository, refused for an unencrypted one), creating it when
    /// the store is empty: encrypted under `key` when one is given.
    pub fn open_or_init_with_key(
        storage: Arc<dyn Storage>,
        key: Option<&KeySource>,
    ) -> RepoResult<Self> {
        match storage.get(CONFIG_KEY) {
            Ok(_) => Self::open_with_key(storage, key),
            Err(StorageError::NotFound(_)) => {
                if storage.list("")?.iter().any(|k| !k.starts_with("tmp/")) {
                    return Err(RepoError::NotARepository(format!(
                        "{} (the directory is not empty and has no {CONFIG_KEY})",
                        storage.describe()
                    )));
                }
                let repository_id = hex::encode(rand::random::<[u8; 8]>());
                let (format_version, hash_key, encryption) = match key {
                    Some(source) => {
                        let (_, encryption) = Keys::generate(source, &repository_id)?;
                        (FORMAT_VERSION_ENCRYPTED, String::new(), Some(encryption))
                    }
                    None => (
                        FORMAT_VERSION_PLAIN,
                        hex::encode(rand::random::<[u8; 32]>()),
                        None,
                    ),
                };
                let config = RepoConfig {
                    format_version,
                    repository_id,
                    created_at: Utc::now(),
                    block_size: DEFAULT_BLOCK_SIZE,
                    hash: "blake3-keyed".into(),
                    hash_key,
                    compression: "zstd".into(),
                    encryption,
                };
                write_config(storage.as_ref(), &config)?;
                Self::open_with_key(storage, key)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Opens an existing unencrypted repository; refuses one written by a
    /// newer format.
    pub fn open(storage: Arc<dyn Storage>) -> RepoResult<Self> {
        Self::open_with_key(storage, None)
    }

    /// Opens an existing repository with `key` (see
    /// [`Repository::open_or_init_with_key`]).
    pub fn open_with_key(storage: Arc<dyn Storage>, key: Option<&KeySource>) -> RepoResult<Self> {
        let bytes = match storage.get(CONFIG_KEY) {
            Ok(b) => b,
            Err(StorageError::NotFound(_)) => {
                return Err(RepoError::NotARepository(storage.describe()))
            }
            Err(e) => return Err(e.into()),
        };
        let raw: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| RepoError::Corrupt {
                object: CONFIG_KEY.into(),
                reason: e.to_string(),
            })?;
        let found = raw
            .get("format_version")
            .and_then(|v| v.as_u64())
            .unwrap_or(0) as u32;
        if found > FORMAT_VERSION {
            return Err(RepoError::NewerFormat {
                found,
                supported: FORMAT_VERSION,
            });
        }
        let config: RepoConfig = serde_json::from_value(raw).map_err(|e| RepoError::Corrupt {
            object: CONFIG_KEY.into(),
            reason: e.to_string(),
        })?;
        let keys = match (&config.encryption, key) {
            (Some(encryption), Some(source)) => {
                Keys::unlock(source, &config.repository_id, encryption)?
            }
            (Some(encryption), None) => {
                return Err(RepoError::KeyRequired(format!(
                    "repository {} ({}) is encrypted: {}",
                    config.repository_id,
                    storage.describe(),
                    crypto::configure_hint(&encryption.key_source)
                )))
            }
            (None, Some(_)) => {
                return Err(RepoError::KeyRequired(format!(
                    "repository {} ({}) is not encrypted but an encryption key is configured; \
                     encryption is chosen when a repository is created (remove the [encryption] settings to use this one)",
                    config.repository_id,
                    storage.describe()
                )))
            }
            (None, None) => {
                let mut hash_key = [0u8; 32];
                hex::decode_to_slice(&config.hash_key, &mut hash_key).map_err(|e| {
                    RepoError::Corrupt {
                        object: CONFIG_KEY.into(),
                        reason: format!("hash_key: {e}"),
                    }
                })?;
                Keys::plain(hash_key)
            }
        };
        if config.block_size == 0 || config.block_size > MAX_BLOCK_SIZE {
            return Err(RepoError::Corrupt {
                object: CONFIG_KEY.into(),
                reason: format!("block_size {} out of range", config.block_size),
            });
        }
        Ok(Repository {
            storage,
            config,
            keys: Arc::new(keys),
            compress_level: DEFAULT_COMPRESS_LEVEL,
            index_cache: None,
        })
    }

    /// Wraps the data key under `new` and stores the configuration: from now
    /// on only `new` unlocks the repository. No data object is rewritten.
    pub fn rotate_key(&mut self, new: &KeySource) -> RepoResult<()> {
        let encryption = self.keys.rewrap(new, &self.config.repository_id)?;
        let mut config = self.config.clone();
        config.encryption = Some(encryption);
        write_config(self.storage.as_ref(), &config)?;
        self.config = config;
        Ok(())
    }

    /// True when the repository is encrypted (its own keys; an instance key
    /// domain is encrypted either way).
    pub fn is_encrypted(&self) -> bool {
        self.keys.repository_keys().is_encrypted()
    }

    /// The repository's own keys, the base of every instance key domain.
    pub fn repository_keys(&self) -> Arc<Keys> {
        Keys::repository_arc(&self.keys)
    }

    /// This repository writing under `keys` (an instance key domain, see
    /// [`Keys::instance_domain`]): new packs and objects are sealed under
    /// them; objects of the repository's domain are still read.
    pub fn in_domain(&self, keys: Keys) -> Repository {
        Repository {
            keys: Arc::new(keys),
            ..self.clone()
        }
    }

    /// This repository also reading the instance domains of `domains` (see
    /// [`Keys::with_read_domains`]); it writes as before. Repository-wide
    /// jobs use it with every instance domain unlocked.
    pub fn with_read_domains(&self, domains: Vec<Arc<Keys>>) -> Repository {
        Repository {
            keys: Arc::new(self.keys.with_read_domains(domains)),
            ..self.clone()
        }
    }

    /// This repository writing in `domain`, one it reads (its own, the
    /// repository's or one of [`Repository::with_read_domains`]'s), reading
    /// that domain and the repository's; `None` when it does not hold it.
    pub fn writing_in(&self, domain: KeyDomain) -> Option<Repository> {
        let keys = if domain == KeyDomain::REPOSITORY {
            self.repository_keys()
        } else if domain == self.keys.domain() {
            self.keys.clone()
        } else {
            self.keys.read_domain(domain)?
        };
        Some(Repository {
            keys,
            ..self.clone()
        })
    }

    /// The keys this repository writes under (its domain's).
    pub fn domain_keys(&self) -> Arc<Keys> {
        self.keys.clone()
    }

    /// This repository writing under the repository's own keys.
    pub fn in_repository_domain(&self) -> Repository {
        Repository {
            keys: self.repository_keys(),
            ..self.clone()
        }
    }

    /// The key domain new packs and objects are sealed under.
    pub fn domain(&self) -> KeyDomain {
        self.keys.domain()
    }

    /// Seals a small secret kept outside the repository (in the catalog)
    /// under the repository's data key, bound to this repository and to
    /// `label`; `None` when the repository is not encrypted.
    pub fn seal_secret(&self, secret: &[u8], label: &str) -> RepoResult<Option<Vec<u8>>> {
        match &self.keys.repository_keys().cipher {
            Some(c) => c.seal(secret, self.secret_aad(label).as_bytes()).map(Some),
            None => Ok(None),
        }
    }

    /// Opens what [`Repository::seal_secret`] sealed with the same label.
    pub fn open_secret(&self, sealed: &[u8], label: &str) -> RepoResult<Vec<u8>> {
        let corrupt = |reason: &str| RepoError::Corrupt {
            object: format!("catalog secret {label}"),
            reason: reason.into(),
        };
        let cipher = self.keys.repository_keys().cipher.as_ref().ok_or_else(|| {
            corrupt("sealed under a repository key, but the repository is not encrypted")
        })?;
        cipher
            .open(sealed, self.secret_aad(label).as_bytes())
            .ok_or_else(|| {
                corrupt(
                    "does not open under this repository's key (altered, or another repository's)",
                )
            })
    }

    fn secret_aad(&self, label: &str) -> String {
        format!("strata-secret/{}/{label}", self.config.repository_id)
    }

    /// zstd level for new blocks and objects (default [`DEFAULT_COMPRESS_LEVEL`]).
    pub fn with_compress_level(mut self, level: i32) -> Self {
        self.compress_level = level;
        self
    }

    /// The repository's configuration object.
    pub fn config(&self) -> &RepoConfig {
        &self.config
    }

    /// The store underneath.
    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    /// The keyed hasher of block addresses.
    pub fn hasher(&self) -> &Hasher {
        &self.keys.hasher
    }

    /// Block size in bytes.
    pub fn block_size(&self) -> usize {
        self.config.block_size as usize
    }

    // ----- instances -----

    /// Stores an instance's record (replacing an older one).
    pub fn put_instance(&self, rec: &InstanceRecord) -> RepoResult<()> {
        // Instance records stay under the repository's keys: every reader lists them.
        let bytes = seal(
            self.keys.repository_keys(),
            ObjectKind::Instance,
            rec,
            &[],
            None,
        )?;
        self.storage.put(&instance_key(&rec.id), &bytes)?;
        Ok(())
    }

    /// The record of one instance, if the repository has it.
    pub fn read_instance(&self, instance_id: &str) -> RepoResult<Option<InstanceRecord>> {
        let key = instance_key(instance_id);
        match self.storage.get(&key) {
            Ok(bytes) => Ok(Some(self.open_instance_record(&key, &bytes)?)),
            Err(StorageError::NotFound(_)) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The records of every instance the repository has.
    pub fn list_instances(&self) -> RepoResult<Vec<InstanceRecord>> {
        let mut out = Vec::new();
        for key in self.storage.list("instances")? {
            if key.ends_with("/instance") {
                let bytes = self.storage.get(&key)?;
                out.push(self.open_instance_record(&key, &bytes)?);
            }
        }
        Ok(out)
    }

    /// An instance record read from `key`. Records are written under the
    /// repository's own keys only, and each under its instance's key: one
    /// sealed in an instance's key domain (whose data key others may hold)
    /// or moved from another instance's key is refused.
    pub(crate) fn open_instance_record(
        &self,
        key: &str,
        bytes: &[u8],
    ) -> RepoResult<InstanceRecord> {
        if crate::object::object_domain(bytes).0 != KeyDomain::REPOSITORY {
            return Err(RepoError::Corrupt {
                object: key.to_string(),
                reason: "an instance record sealed in an instance's key domain".into(),
            });
        }
        let rec: InstanceRecord = open(&self.keys, key, ObjectKind::Instance, bytes)?.meta;
        if instance_key(&rec.id) != key {
            return Err(RepoError::Corrupt {
                object: key.to_string(),
                reason: format!("the record of instance {} under another key", rec.id),
            });
        }
        Ok(rec)
    }

    // ----- backup sets -----

    /// Starts writing blocks, deduplicating against `known` (usually
    /// [`Repository::block_index`]).
    pub fn block_writer(&self, known: BlockIndex) -> BlockWriter {
        BlockWriter {
            repo: self.clone(),
            index: known,
            pack: PackBuilder::with_buffer(&self.keys, Vec::with_capacity(PACK_BUFFER_CAPACITY)),
            stats: BackupStats::default(),
            uploads: None,
            broken: false,
        }
    }

    /// Writes the manifest: from this moment the backup set exists.
    pub fn commit_manifest(&self, manifest: &BackupManifest) -> RepoResult<()> {
        let key = manifest_key(&manifest.instance_id, &manifest.backup_id);
        manifest
            .validate()
            .map_err(|source| RepoError::UnsafeEntry {
                object: key.clone(),
                source,
            })?;
        let bytes = seal(
            &self.keys,
            ObjectKind::Manifest,
            &serde_json::json!({"backup_id": manifest.backup_id}),
            &serde_json::to_vec(manifest).map_err(|e| RepoError::Format(e.to_string()))?,
            Some(3),
        )?;
        // Under Object Lock, every pack the set needs must be kept at least
        // as long as the set itself, reused ones included.
        let mut packs: Vec<&str> = manifest
            .all_files()
            .flat_map(|f| f.blocks.iter().map(|b| b.pack.as_str()))
            .collect();
        packs.sort_unstable();
        packs.dedup();
        for pack in packs {
            self.storage.retain(&pack_key(pack))?;
        }
        self.storage.retain(CONFIG_KEY)?;
        self.storage.retain(&instance_key(&manifest.instance_id))?;
        self.storage.put(&key, &bytes)?;
        Ok(())
    }

    /// The manifest of a backup set; [`RepoError::BackupNotFound`] when there is none.
    pub fn read_manifest(&self, instance_id: &str, backup_id: &str) -> RepoResult<BackupManifest> {
        let key = manifest_key(instance_id, backup_id);
        let bytes = match self.storage.get(&key) {
            Ok(b) => b,
            Err(StorageError::NotFound(_)) => {
                return Err(RepoError::BackupNotFound(backup_id.to_string()))
            }
            Err(e) => return Err(e.into()),
        };
        self.decode_manifest(&key, &bytes)
    }

    /// The databases and tables recorded with a backup set (`None` for a
    /// set taken before they were recorded), without building its file
    /// list: a large set's manifest holds millions of block references.
    pub fn read_contents(
        &self,
        instance_id: &str,
        backup_id: &str,
    ) -> RepoResult<Option<BackupContents>> {
        /// The manifest's fields this reader needs; the others are skipped.
        #[derive(serde::Deserialize)]
        struct ContentsOnly {
            #[serde(default)]
            format_version: u32,
            #[serde(default)]
            contents: Option<BackupContents>,
        }
        let key = manifest_key(instance_id, backup_id);
        let bytes = match self.storage.get(&key) {
            Ok(b) => b,
            Err(StorageError::NotFound(_)) => {
                return Err(RepoError::BackupNotFound(backup_id.to_string()))
            }
            Err(e) => return Err(e.into()),
        };
        let opened = open::<serde_json::Value>(&self.keys, &key, ObjectKind::Manifest, &bytes)?;
        let read: ContentsOnly =
            serde_json::from_slice(&opened.payload).map_err(|e| RepoError::Corrupt {
                object: key.clone(),
                reason: e.to_string(),
            })?;
        if read.format_version > manifest::MANIFEST_VERSION {
            return Err(RepoError::NewerFormat {
                found: read.format_version,
                supported: manifest::MANIFEST_VERSION,
            });
        }
        Ok(read.contents)
    }

    fn decode_manifest(&self, key: &str, bytes: &[u8]) -> RepoResult<BackupManifest> {
        let opened = open::<serde_json::Value>(&self.keys, key, ObjectKind::Manifest, bytes)?;
        let raw: serde_json::Value =
            serde_json::from_slice(&opened.payload).map_err(|e| RepoError::Corrupt {
                object: key.to_string(),
                reason: e.to_string(),
            })?;
        let version = raw
            .get("format_version")
            .and_then(|v| v.as_u64())
            .unwrap_or(0) as u32;
        if version > manifest::MANIFEST_VERSION {
            return Err(RepoError::NewerFormat {
                found: version,
                supported: manifest::MANIFEST_VERSION,
            });
        }
        let manifest: BackupManifest =
            serde_json::from_value(raw).map_err(|e| RepoError::Corrupt {
                object: key.to_string(),
                reason: e.to_string(),
            })?;
        // Sealed is not trusted: whoever can write a plain repository has its
        // hash key, so every name is checked before anyone acts on it.
        manifest
            .validate()
            .map_err(|source| RepoError::UnsafeEntry {
                object: key.to_string(),
                source,
            })?;
        Ok(manifest)
    }

    /// Backup set ids of an instance, oldest first.
    pub fn list_backups(&self, instance_id: &str) -> RepoResult<Vec<BackupId>> {
        let prefix = format!("instances/{instance_id}/backups");
        let mut ids: Vec<BackupId> = self
            .storage
            .list(&prefix)?
            .into_iter()
            .filter_map(|k| {
                k.strip_prefix(&format!("{prefix}/"))
                    .and_then(|rest| rest.strip_suffix(".manifest"))
                    .map(BackupId::from)
            })
            .collect();
        ids.sort();
        Ok(ids)
    }

    /// Reads one block, checking it against its content hash.
    pub fn read_block(&self, block: &BlockRef) -> RepoResult<Vec<u8>> {
        let key = pack_key(&block.pack);
        let data = self
            .storage
            .get_range(&key, block.offset, block.stored_len as u64)?;
        self.decode_block(&key, block, &data)
    }

    /// Reads `blocks` in order and hands each one, checked against its
    /// hash, to `sink`. Blocks lying back to back in one pack (a file's new
    /// blocks usually do) are fetched with one ranged read of up to
    /// [`READ_RUN_MAX`] bytes instead of one read each. When there are
    /// several such reads, the next one is fetched on a helper thread while
    /// the current one is decoded, so a slow store's latency overlaps the
    /// decompression.
    pub fn read_blocks<E: From<RepoError>>(
        &self,
        blocks: &[BlockRef],
        mut sink: impl FnMut(Vec<u8>) -> Result<(), E>,
    ) -> Result<(), E> {
        let runs = read_runs(blocks);
        let mut decode = |run: &ReadRun, data: Vec<u8>| -> Result<(), E> {
            let first = &blocks[run.blocks.start];
            for block in &blocks[run.blocks.clone()] {
                let at = (block.offset - first.offset) as usize;
                let stored = data
                    .get(at..at + block.stored_len as usize)
                    .ok_or_else(|| RepoError::Corrupt {
                        object: run.key.clone(),
                        reason: format!("block at offset {} lies past the read", block.offset),
                    })?;
                sink(self.decode_block(&run.key, block, stored)?)?;
            }
            Ok(())
        };
        if runs.len() < 2 {
            for run in &runs {
                decode(run, self.fetch_run(run)?)?;
            }
            return Ok(());
        }
        // Fetcher `j` of `depth` reads runs j, j + depth, ... in turn and
        // hands each over through a rendezvous, so up to `depth` reads are
        // in flight or waiting while one is decoded, in the file's order.
        let wanted = self.storage.concurrent_reads().clamp(1, runs.len());
        let extra = ExtraReads::take(wanted - 1);
        let depth = 1 + extra.0;
        std::thread::scope(|scope| {
            let runs = &runs;
            let mut fetched = Vec::with_capacity(depth);
            for first in 0..depth {
                let (tx, rx) = std::sync::mpsc::sync_channel::<RepoResult<Vec<u8>>>(0);
                fetched.push(rx);
                scope.spawn(move || {
                    for run in runs.iter().skip(first).step_by(depth) {
                        let data = self.fetch_run(run);
                        let failed = data.is_err();
                        // A closed channel: the reader stopped on an error.
                        if tx.send(data).is_err() || failed {
                            return;
                        }
                    }
                });
            }
            for (i, run) in runs.iter().enumerate() {
                let data = fetched[i % depth].recv().map_err(|_| {
                    RepoError::Format("a read-ahead thread stopped without an answer".into())
                })??;
                decode(run, data)?;
            }
            Ok(())
        })
    }

    fn fetch_run(&self, run: &ReadRun) -> RepoResult<Vec<u8>> {
        Ok(self.storage.get_range(&run.key, run.offset, run.len)?)
    }

    fn decode_block(&self, key: &str, block: &BlockRef, stored: &[u8]) -> RepoResult<Vec<u8>> {
        let entry = PackEntry {
            hash: block.hash,
            offset: block.offset,
            stored_len: block.stored_len,
            raw_len: block.raw_len,
            compression: block.compression,
        };
        let decoded = decode_checked(&self.keys, key, &entry, stored);
        if decoded.is_err() {
            // A block reference carries no key domain: one of a set taken
            // before the instance's domain existed is under the repository's
            // keys, and a repository-wide reader holds every instance's.
            // All are authenticated (AEAD or keyed hash), so trying another
            // never yields another block's bytes.
            for other in self.keys.other_domains() {
                if let Ok(raw) = decode_checked(other, key, &entry, stored) {
                    return Ok(raw);
                }
            }
        }
        decoded
    }
}

/// The most [`Repository::read_blocks`] fetches with one read.
pub const READ_RUN_MAX: u64 = 8 * 1024 * 1024;

/// Fetchers beyond the first one of each that all of a process's
/// [`Repository::read_blocks`] calls run at once: each holds up to two
/// reads of [`READ_RUN_MAX`], so however many threads read (a restore runs
/// two per core), read-ahead adds at most 16 × 16 MiB.
const EXTRA_READS_MAX: usize = 16;

static EXTRA_READS: AtomicUsize = AtomicUsize::new(0);

/// Extra fetchers taken from [`EXTRA_READS_MAX`] for one read, given back
/// when dropped; as many as are free, none when all are taken (a read
/// never waits for them).
struct ExtraReads(usize);

impl ExtraReads {
    fn take(wanted: usize) -> Self {
        let mut taken = 0;
        let _ = EXTRA_READS.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |used| {
            taken = wanted.min(EXTRA_READS_MAX.saturating_sub(used));
            Some(used + taken)
        });
        ExtraReads(taken)
    }
}

impl Drop for ExtraReads {
    fn drop(&mut self) {
        EXTRA_READS.fetch_sub(self.0, Ordering::SeqCst);
    }
}

/// One ranged read of [`Repository::read_blocks`]: `blocks` (indexes into
/// its argument) lie back to back in the pack `key` from `offset`.
struct ReadRun {
    key: String,
    offset: u64,
    len: u64,
    blocks: std::ops::Range<usize>,
}

/// Groups `blocks` into ranged reads of at most [`READ_RUN_MAX`] bytes.
fn read_runs(blocks: &[BlockRef]) -> Vec<ReadRun> {
    let mut runs = Vec::new();
    let mut i = 0;
    while i < blocks.len() {
        let first = &blocks[i];
        let mut end = i + 1;
        let mut run_end = first.offset + first.stored_len as u64;
        while let Some(next) = blocks.get(end) {
            let adjacent =
                next.pack == first.pack && next.offset == run_end + pack::BLOB_HEADER_LEN as u64;
            let next_end = next.offset + next.stored_len as u64;
            if !adjacent || next_end - first.offset > READ_RUN_MAX {
                break;
            }
            run_end = next_end;
            end += 1;
        }
        runs.push(ReadRun {
            key: pack_key(&first.pack),
            offset: first.offset,
            len: run_end - first.offset,
            blocks: i..end,
        });
        i = end;
    }
    runs
}

/// Room for a full pack: blobs up to [`DEFAULT_PACK_SIZE`] plus the block
/// that crosses it and the index, so a pack buffer never reallocates.
const PACK_BUFFER_CAPACITY: usize = DEFAULT_PACK_SIZE + 1024 * 1024;

/// Stores blocks for one backup: hashes, deduplicates, compresses and packs.
/// Packs are written as they fill; [`BlockWriter::finish`] writes the last one.
/// Nothing here is visible as a backup until the manifest is committed.
pub struct BlockWriter {
    repo: Repository,
    index: BlockIndex,
    pack: PackBuilder,
    stats: BackupStats,
    uploads: Option<PackUploads>,
    /// Set when a pack failed to be stored: nothing more is accepted.
    broken: bool,
}

/// Full packs are sealed and stored by threads of their own, so adding blocks
/// never waits for the disk or the network: up to
/// [`Storage::concurrent_puts`] packs are stored at once while the next one
/// fills. The hand-over waits for a free thread, which bounds memory to that
/// many pack buffers plus the one filling. The first failure stops the others
/// from taking more packs and is what the writer reports. Stored packs'
/// buffers come back for reuse.
struct PackUploads {
    /// A rendezvous channel: a pack is handed over only to an idle thread.
    tx: std::sync::mpsc::SyncSender<PackBuilder>,
    spare: std::sync::mpsc::Receiver<Vec<u8>>,
    failure: Arc<std::sync::Mutex<Option<RepoError>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// The most packs stored at once, whatever the store asks for: each one in
/// flight holds a pack buffer.
const MAX_PACKS_IN_FLIGHT: usize = 16;

impl PackUploads {
    fn start(repo: &Repository) -> RepoResult<Self> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<PackBuilder>(0);
        let rx = Arc::new(std::sync::Mutex::new(rx));
        let (spare_tx, spare) = std::sync::mpsc::channel();
        let failure = Arc::new(std::sync::Mutex::new(None));
        let in_flight = repo.storage.concurrent_puts().clamp(1, MAX_PACKS_IN_FLIGHT);
        let mut threads = Vec::with_capacity(in_flight);
        for n in 0..in_flight {
            let (rx, spare_tx, failure) = (rx.clone(), spare_tx.clone(), failure.clone());
            let (storage, keys) = (repo.storage.clone(), repo.keys.clone());
            let thread = std::thread::Builder::new()
                .name(format!("strata-packs-{n}"))
                .spawn(move || store_packs(&rx, storage.as_ref(), &keys, &spare_tx, &failure))
                .map_err(|source| StorageError::Io {
                    key: "packs".into(),
                    source,
                })?;
            threads.push(thread);
        }
        Ok(PackUploads {
            tx,
            spare,
            failure,
            threads,
        })
    }

    /// True once a pack failed to be stored.
    fn failed(&self) -> bool {
        lock(&self.failure).is_some()
    }

    /// Waits for every pack handed over to be stored; the first failure.
    fn finish(self) -> RepoResult<()> {
        drop(self.tx);
        let mut panicked = false;
        for thread in self.threads {
            panicked |= thread.join().is_err();
        }
        if let Some(e) = lock(&self.failure).take() {
            return Err(e);
        }
        if panicked {
            return Err(RepoError::Format("a pack writer thread panicked".into()));
        }
        Ok(())
    }
}

/// One pack writer thread: seals and stores packs until the channel closes
/// or a pack (this thread's or another's) fails.
fn store_packs(
    rx: &std::sync::Mutex<std::sync::mpsc::Receiver<PackBuilder>>,
    storage: &dyn Storage,
    keys: &Keys,
    spare: &std::sync::mpsc::Sender<Vec<u8>>,
    failure: &std::sync::Mutex<Option<RepoError>>,
) {
    loop {
        let Ok(pack) = lock(rx).recv() else { return };
        if lock(failure).is_some() {
            return;
        }
        let (id, bytes) = pack.finish(keys);
        let bytes = bytes::Bytes::from(bytes);
        match storage.put_bytes(&pack_key(&id), bytes.clone()) {
            // The store dropped its references: the buffer comes back whole.
            Ok(()) => {
                let _ = spare.send(Vec::from(bytes));
            }
            Err(e) => {
                lock(failure).get_or_insert(e.into());
                return;
            }
        }
    }
}

/// A mutex's contents even if a holder panicked (the values kept under
/// these locks stay whole).
fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A block hashed (and, when new, compressed and encrypted) away from the
/// writer, so the expensive part can run on several threads.
pub struct PreparedBlock {
    hash: BlockHash,
    raw_len: u32,
    encoded: Option<RepoResult<(u8, Vec<u8>)>>,
}

impl BlockWriter {
    /// Hashes, compresses and encrypts `raw` without touching the writer's
    /// state; safe to call from many threads. Encoding is skipped for blocks
    /// `known` says are stored already.
    pub fn prepare(
        repo: &Repository,
        raw: &[u8],
        known: impl Fn(&BlockHash) -> bool,
    ) -> PreparedBlock {
        let hash = repo.keys.hasher.hash(raw);
        let encoded = if known(&hash) {
            None
        } else {
            Some(encode_blob(&repo.keys, &hash, raw, repo.compress_level))
        };
        PreparedBlock {
            hash,
            raw_len: raw.len() as u32,
            encoded,
        }
    }

    /// True when the block is already stored or written by this writer.
    pub fn contains(&self, hash: &BlockHash) -> bool {
        self.index.contains(hash)
    }

    /// Stores `raw` (unless already stored) and returns its reference.
    pub fn add(&mut self, raw: &[u8]) -> RepoResult<BlockRef> {
        let prepared = Self::prepare(&self.repo, raw, |h| self.index.contains(h));
        self.add_prepared(prepared, raw)
    }

    /// Records a block that is already stored, taken by reference without
    /// reading it (an unchanged block of an earlier backup).
    pub fn add_existing(&mut self, block: &BlockRef) -> BlockRef {
        self.stats.dedup_blocks += 1;
        self.stats.dedup_bytes += block.raw_len as u64;
        if let Some(known) = self.index.get(&block.hash) {
            return known;
        }
        self.index.map.insert(block.hash, block.clone());
        block.clone()
    }

    /// Stores a block prepared by [`BlockWriter::prepare`]; `raw` is only
    /// needed when the block turned out new but was prepared as known.
    pub fn add_prepared(&mut self, prepared: PreparedBlock, raw: &[u8]) -> RepoResult<BlockRef> {
        self.check_usable()?;
        if let Some(existing) = self.index.get(&prepared.hash) {
            self.stats.dedup_blocks += 1;
            self.stats.dedup_bytes += prepared.raw_len as u64;
            return Ok(existing);
        }
        let (compression, data) = match prepared.encoded {
            Some(encoded) => encoded?,
            None => encode_blob(
                &self.repo.keys,
                &prepared.hash,
                raw,
                self.repo.compress_level,
            )?,
        };
        let entry = self
            .pack
            .push(prepared.hash, prepared.raw_len, compression, &data);
        let block = BlockRef {
            hash: prepared.hash,
            pack: self.pack.id().clone(),
            offset: entry.offset,
            stored_len: entry.stored_len,
            raw_len: entry.raw_len,
            compression,
        };
        self.stats.new_blocks += 1;
        self.stats.new_bytes += prepared.raw_len as u64;
        self.stats.stored_bytes += data.len() as u64;
        self.index.map.insert(prepared.hash, block.clone());
        if self.pack.len() >= DEFAULT_PACK_SIZE {
            self.flush()?;
        }
        Ok(block)
    }

    fn check_usable(&self) -> RepoResult<()> {
        match self.broken {
            true => Err(RepoError::Format(
                "an earlier pack failed to be stored; this backup cannot continue".into(),
            )),
            false => Ok(()),
        }
    }

    /// Hands the current pack to an upload thread and starts the next one.
    fn flush(&mut self) -> RepoResult<()> {
        self.check_usable()?;
        if self.pack.is_empty() {
            return Ok(());
        }
        let uploads = match self.uploads.take() {
            Some(uploads) => uploads,
            None => PackUploads::start(&self.repo)?,
        };
        if uploads.failed() {
            self.broken = true;
            return Err(stopped_uploads(uploads));
        }
        let buf = uploads
            .spare
            .try_recv()
            .unwrap_or_else(|_| Vec::with_capacity(PACK_BUFFER_CAPACITY));
        let pack = std::mem::replace(
            &mut self.pack,
            PackBuilder::with_buffer(&self.repo.keys, buf),
        );
        if uploads.tx.send(pack).is_err() {
            // Every thread stopped on an error: report it.
            self.broken = true;
            return Err(stopped_uploads(uploads));
        }
        self.uploads = Some(uploads);
        self.stats.packs += 1;
        Ok(())
    }

    /// Stores the last pack and waits until every pack is stored; returns
    /// the counters for the manifest.
    pub fn finish(self) -> RepoResult<BackupStats> {
        Ok(self.finish_indexed()?.0)
    }

    /// [`BlockWriter::finish`], also returning the blocks the index did not
    /// hold, for [`Repository::commit_backup`].
    pub fn finish_indexed(mut self) -> RepoResult<(BackupStats, AddedBlocks)> {
        self.flush()?;
        if let Some(uploads) = self.uploads.take() {
            uploads.finish()?;
        }
        Ok((self.stats, self.index.added()))
    }

    /// What the writer stored so far.
    pub fn stats(&self) -> &BackupStats {
        &self.stats
    }
}

fn write_config(storage: &dyn Storage, config: &RepoConfig) -> RepoResult<()> {
    let bytes = serde_json::to_vec_pretty(config).map_err(|e| RepoError::Format(e.to_string()))?;
    storage.put(CONFIG_KEY, &bytes)?;
    Ok(())
}

/// The error that stopped the pack writer threads, once they all returned.
fn stopped_uploads(uploads: PackUploads) -> RepoError {
    match uploads.finish() {
        Err(e) => e,
        Ok(()) => RepoError::Format("the pack writer threads stopped".into()),
    }
}

/// Key of a pack object.
pub fn pack_key(id: &str) -> String {
    let shard = id.get(..2).unwrap_or("00");
    format!("packs/{shard}/{id}.pack")
}

/// Key of a backup set's manifest.
pub fn manifest_key(instance_id: &str, backup_id: &str) -> String {
    format!("instances/{instance_id}/backups/{backup_id}.manifest")
}

/// A blob decoded under `keys` and checked against its address.
fn decode_checked(keys: &Keys, key: &str, entry: &PackEntry, stored: &[u8]) -> RepoResult<Vec<u8>> {
    let raw = pack::decode_blob(keys, key, entry, stored)?;
    if keys.hasher.hash(&raw) != entry.hash {
        return Err(RepoError::Corrupt {
            object: key.to_string(),
            reason: format!(
                "block {} at offset {} does not match its hash",
                entry.hash, entry.offset
            ),
        });
    }
    Ok(raw)
}

/// Key of an instance's record.
pub fn instance_key(instance_id: &str) -> String {
    format!("instances/{instance_id}/instance")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pack::{COMPRESSION_NONE, COMPRESSION_ZSTD};

    fn repo() -> (tempfile::TempDir, Repository) {
        let dir = tempfile::tempdir().unwrap();
        let storage = Arc::new(LocalStorage::new(dir.path().join("repo")).unwrap());
        (dir, Repository::open_or_init(storage).unwrap())
    }

    #[test]
    fn blocks_dedup_and_read_back() {
        let (_d, repo) = repo();
        let mut w = repo.block_writer(BlockIndex::default());
        let a = vec![1u8; 1000];
        let b: Vec<u8> = (0..5000u32).map(|i| (i * 7919 % 251) as u8).collect();
        let ra = w.add(&a).unwrap();
        let rb = w.add(&b).unwrap();
        let ra2 = w.add(&a).unwrap();
        assert_eq!(ra, ra2);
        let stats = w.finish().unwrap();
        assert_eq!(stats.new_blocks, 2);
        assert_eq!(stats.dedup_blocks, 1);
        assert_eq!(repo.read_block(&ra).unwrap(), a);
        assert_eq!(repo.read_block(&rb).unwrap(), b);
    }

    #[test]
    fn contents_are_read_back_alone_and_absent_in_older_sets() {
        let (_d, repo) = repo();
        let old = crate::manifest::one_file_manifest("i", "1000", Vec::new(), 0);
        repo.commit_manifest(&old).unwrap();
        let mut new = crate::manifest::one_file_manifest("i", "2000", Vec::new(), 0);
        let contents = BackupContents {
            read_at: Utc::now(),
            databases: vec![DatabaseContents {
                oid: 16384,
                name: "a,b 'c\"".into(),
                size: Some(7_000_000),
                tables: Some(vec![TableContents {
                    oid: 16390,
                    schema: "s.x".into(),
                    name: "表".into(),
                    kind: "r".into(),
                    size: 8192,
                }]),
                truncated: false,
            }],
        };
        new.contents = Some(contents.clone());
        repo.commit_manifest(&new).unwrap();
        assert_eq!(repo.read_contents("i", "2000").unwrap(), Some(contents));
        assert_eq!(repo.read_manifest("i", "2000").unwrap(), new);
        assert_eq!(repo.read_contents("i", "1000").unwrap(), None);
        assert!(matches!(
            repo.read_contents("i", "3000"),
            Err(RepoError::BackupNotFound(_))
        ));
    }

    /// Bytes zstd cannot shrink (xorshift), for incompressible blocks.
    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn blocks_are_compressed_only_when_it_helps() {
        let block = DEFAULT_BLOCK_SIZE as usize;
        let (code, stored) = pack::compress_block(&noise(block, 1), 1);
        assert_eq!((code, stored.len()), (COMPRESSION_NONE, block));
        let text: Vec<u8> = b"every page of a table looks alike ".repeat(block / 34);
        let (code, stored) = pack::compress_block(&text, 1);
        assert_eq!(code, COMPRESSION_ZSTD);
        assert!(stored.len() < text.len() / 10);
        // The thread's context follows a change of level.
        let (code, stored3) = pack::compress_block(&text, 3);
        assert_eq!(code, COMPRESSION_ZSTD);
        assert_eq!(zstd::bulk::decompress(&stored3, text.len()).unwrap(), text);
    }

    #[test]
    fn packs_fill_on_the_upload_thread_and_read_back_in_runs() {
        let (_d, repo) = repo();
        let mut w = repo.block_writer(BlockIndex::default());
        let block = DEFAULT_BLOCK_SIZE as usize;
        let blocks: Vec<Vec<u8>> = (0..(DEFAULT_PACK_SIZE * 5 / 2 / block) as u64)
            .map(|i| {
                if i % 3 == 0 {
                    vec![i as u8; block]
                } else {
                    noise(block, i)
                }
            })
            .collect();
        let refs: Vec<BlockRef> = blocks.iter().map(|b| w.add(b).unwrap()).collect();
        let stats = w.finish().unwrap();
        assert!(stats.packs >= 2, "{} packs", stats.packs);
        assert_eq!(
            repo.storage().list("packs").unwrap().len() as u64,
            stats.packs
        );
        let mut back = Vec::new();
        repo.read_blocks(&refs, |raw| {
            back.push(raw);
            Ok::<_, RepoError>(())
        })
        .unwrap();
        assert_eq!(back, blocks);
        // Out of order and repeated blocks read back too.
        let shuffled = vec![
            refs[40].clone(),
            refs[3].clone(),
            refs[3].clone(),
            refs[0].clone(),
        ];
        let mut back = Vec::new();
        repo.read_blocks(&shuffled, |raw| {
            back.push(raw);
            Ok::<_, RepoError>(())
        })
        .unwrap();
        assert_eq!(
            back,
            vec![
                blocks[40].clone(),
                blocks[3].clone(),
                blocks[3].clone(),
                blocks[0].clone()
            ]
        );
    }

    #[test]
    fn a_failed_pack_write_fails_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("repo");
        let storage = Arc::new(LocalStorage::new(&root).unwrap());
        let repo = Repository::open_or_init(storage).unwrap();
        // A file where the packs directory should be: every pack put fails.
        std::fs::write(root.join("packs"), b"").unwrap();
        let mut w = repo.block_writer(BlockIndex::default());
        let block = DEFAULT_BLOCK_SIZE as usize;
        let mut failed = false;
        for i in 0..(DEFAULT_PACK_SIZE * 3 / block) as u64 {
            if w.add(&noise(block, i)).is_err() {
                failed = true;
                break;
            }
        }
        assert!(failed || w.finish().is_err());
    }

    /// Calls that wait at the gate until `wanted` of them are in flight at
    /// once, or `wait` passes (then the test fails on the count).
    #[derive(Debug)]
    struct Gate {
        wanted: usize,
        wait: std::time::Duration,
        /// In flight, most at once, calls so far.
        state: std::sync::Mutex<(usize, usize, usize)>,
        changed: std::sync::Condvar,
    }

    impl Gate {
        fn new(wanted: usize, wait: std::time::Duration) -> Self {
            Gate {
                wanted,
                wait,
                state: Default::default(),
                changed: Default::default(),
            }
        }

        /// Waits at the gate; returns the call's number, from 1.
        fn pass(&self) -> usize {
            let mut st = self.state.lock().unwrap();
            st.0 += 1;
            st.1 = st.1.max(st.0);
            st.2 += 1;
            let n = st.2;
            self.changed.notify_all();
            let deadline = std::time::Instant::now() + self.wait;
            while st.1 < self.wanted && std::time::Instant::now() < deadline {
                st = self
                    .changed
                    .wait_timeout(st, std::time::Duration::from_millis(100))
                    .unwrap()
                    .0;
            }
            st.0 -= 1;
            n
        }

        fn most_in_flight(&self) -> usize {
            self.state.lock().unwrap().1
        }
    }

    /// Pack puts wait (up to a minute) until `wanted` are in flight at
    /// once; the `fail`-th pack put then fails with a refusal.
    #[derive(Debug)]
    struct GatedPacks {
        inner: MemoryStorage,
        fail: Option<usize>,
        gate: Gate,
    }

    impl GatedPacks {
        fn new(wanted: usize, fail: Option<usize>) -> Self {
            GatedPacks {
                inner: MemoryStorage::new(),
                fail,
                gate: Gate::new(wanted, std::time::Duration::from_secs(60)),
            }
        }

        fn most_in_flight(&self) -> usize {
            self.gate.most_in_flight()
        }
    }

    impl Storage for GatedPacks {
        fn put(&self, key: &str, data: &[u8]) -> storage::StorageResult<()> {
            if !key.starts_with("packs/") {
                return self.inner.put(key, data);
            }
            let n = self.gate.pass();
            if Some(n) == self.fail {
                return Err(StorageError::Remote {
                    op: "put",
                    key: key.into(),
                    message: "injected: 403 AccessDenied".into(),
                    transient: false,
                });
            }
            self.inner.put(key, data)
        }
        fn get(&self, key: &str) -> storage::StorageResult<Vec<u8>> {
            self.inner.get(key)
        }
        fn get_range(&self, key: &str, offset: u64, len: u64) -> storage::StorageResult<Vec<u8>> {
            self.inner.get_range(key, offset, len)
        }
        fn list(&self, prefix: &str) -> storage::StorageResult<Vec<String>> {
            self.inner.list(prefix)
        }
        fn list_sizes(&self, prefix: &str) -> storage::StorageResult<Vec<ObjectSize>> {
            self.inner.list_sizes(prefix)
        }
        fn delete(&self, key: &str) -> storage::StorageResult<()> {
            self.inner.delete(key)
        }
        fn exists(&self, key: &str) -> storage::StorageResult<bool> {
            self.inner.exists(key)
        }
        fn concurrent_puts(&self) -> usize {
            3
        }
        fn describe(&self) -> String {
            "gated".into()
        }
    }

    /// Blocks of noise filling `packs` packs.
    fn pack_loads(packs: usize) -> Vec<Vec<u8>> {
        let block = DEFAULT_BLOCK_SIZE as usize;
        (0..(DEFAULT_PACK_SIZE * packs / block) as u64)
            .map(|i| noise(block, i + 1))
            .collect()
    }

    #[test]
    fn packs_are_stored_several_at_once() {
        let store = Arc::new(GatedPacks::new(3, None));
        let repo = Repository::open_or_init(store.clone()).unwrap();
        let mut w = repo.block_writer(BlockIndex::default());
        let blocks = pack_loads(5);
        let refs: Vec<BlockRef> = blocks.iter().map(|b| w.add(b).unwrap()).collect();
        let stats = w.finish().unwrap();
        assert_eq!(store.most_in_flight(), 3);
        assert_eq!(
            store.list("packs").unwrap().len() as u64,
            stats.packs,
            "every pack handed over is stored when finish returns"
        );
        let mut back = Vec::new();
        repo.read_blocks(&refs, |raw| {
            back.push(raw);
            Ok::<_, RepoError>(())
        })
        .unwrap();
        assert_eq!(back, blocks);
    }

    #[test]
    fn one_failed_pack_among_several_in_flight_fails_the_writer() {
        let store = Arc::new(GatedPacks::new(2, Some(2)));
        let repo = Repository::open_or_init(store.clone()).unwrap();
        let mut w = repo.block_writer(BlockIndex::default());
        let mut error = None;
        for block in pack_loads(6) {
            if let Err(e) = w.add(&block) {
                error = Some(e);
                break;
            }
        }
        let error = match error {
            Some(e) => {
                // Nothing more is accepted after a failure.
                assert!(w.add(&noise(1000, 7)).is_err());
                assert!(w.finish().is_err());
                e
            }
            None => w.finish().unwrap_err(),
        };
        assert!(error.to_string().contains("injected: 403"), "{error}");
        assert!(!error.is_transient());
        assert!(store.most_in_flight() >= 2);
    }

    /// Ranged reads wait until `wanted` are in flight at once (or 5 s
    /// pass: a reader with fewer in flight waits that long for each, and
    /// the test then fails on the count); the read from offset `fail`
    /// fails.
    #[derive(Debug)]
    struct GatedReads {
        inner: Arc<MemoryStorage>,
        reads: usize,
        fail: Option<u64>,
        gate: Gate,
    }

    impl Storage for GatedReads {
        fn put(&self, key: &str, data: &[u8]) -> storage::StorageResult<()> {
            self.inner.put(key, data)
        }
        fn get(&self, key: &str) -> storage::StorageResult<Vec<u8>> {
            self.inner.get(key)
        }
        fn get_range(&self, key: &str, offset: u64, len: u64) -> storage::StorageResult<Vec<u8>> {
            self.gate.pass();
            if Some(offset) == self.fail {
                return Err(StorageError::Remote {
                    op: "get",
                    key: key.into(),
                    message: "injected: 500 InternalError".into(),
                    transient: true,
                });
            }
            self.inner.get_range(key, offset, len)
        }
        fn list(&self, prefix: &str) -> storage::StorageResult<Vec<String>> {
            self.inner.list(prefix)
        }
        fn list_sizes(&self, prefix: &str) -> storage::StorageResult<Vec<ObjectSize>> {
            self.inner.list_sizes(prefix)
        }
        fn delete(&self, key: &str) -> storage::StorageResult<()> {
            self.inner.delete(key)
        }
        fn exists(&self, key: &str) -> storage::StorageResult<bool> {
            self.inner.exists(key)
        }
        fn concurrent_reads(&self) -> usize {
            self.reads
        }
        fn describe(&self) -> String {
            "gated reads".into()
        }
    }

    /// A file is read with the store's number of reads in flight, no more,
    /// and handed over in its own order; a failed read fails the whole read
    /// after exactly the blocks before it.
    #[test]
    fn a_file_is_read_several_ranges_at_once_in_order() {
        for (fail, wanted) in [(None, 4), (Some(5), 1)] {
            let gate = || Gate::new(wanted, std::time::Duration::from_secs(5));
            let store = Arc::new(GatedReads {
                inner: Arc::new(MemoryStorage::new()),
                reads: 4,
                fail: None,
                gate: gate(),
            });
            let repo = Repository::open_or_init(store.clone()).unwrap();
            let mut w = repo.block_writer(BlockIndex::default());
            let blocks: Vec<Vec<u8>> = (0..12).map(|i| noise(4096, i + 1)).collect();
            let refs: Vec<BlockRef> = blocks.iter().map(|b| w.add(b).unwrap()).collect();
            w.finish().unwrap();
            // Every other block, backwards: no two adjacent, one read each.
            let order: Vec<usize> = (0..12).rev().step_by(2).chain((0..12).step_by(2)).collect();
            let wanted_refs: Vec<BlockRef> = order.iter().map(|&i| refs[i].clone()).collect();
            // The read of the block at position `fail` in the file fails.
            let store = Arc::new(GatedReads {
                inner: store.inner.clone(),
                reads: 4,
                fail: fail.map(|n| wanted_refs[n].offset),
                gate: gate(),
            });
            let repo = Repository::open(store.clone()).unwrap();
            let mut back = Vec::new();
            let outcome = repo.read_blocks(&wanted_refs, |raw| {
                back.push(raw);
                Ok::<_, RepoError>(())
            });
            let expected: Vec<Vec<u8>> = order.iter().map(|&i| blocks[i].clone()).collect();
            match fail {
                None => {
                    outcome.unwrap();
                    assert_eq!(back, expected);
                    assert_eq!(store.gate.most_in_flight(), 4, "most reads in flight");
                }
                Some(n) => {
                    let err = outcome.unwrap_err();
                    assert!(err.to_string().contains("injected: 500"), "{err}");
                    assert_eq!(back, expected[..n].to_vec());
                }
            }
        }
    }

    /// A store whose listing names objects that are gone by the time they
    /// are read, as when retention deletes them while a verify runs.
    #[derive(Debug)]
    struct Vanishing(MemoryStorage, std::sync::atomic::AtomicBool);

    impl Storage for Vanishing {
        fn put(&self, key: &str, data: &[u8]) -> storage::StorageResult<()> {
            self.0.put(key, data)
        }
        fn get(&self, key: &str) -> storage::StorageResult<Vec<u8>> {
            self.0.get(key)
        }
        fn get_range(&self, key: &str, offset: u64, len: u64) -> storage::StorageResult<Vec<u8>> {
            self.0.get_range(key, offset, len)
        }
        fn list(&self, prefix: &str) -> storage::StorageResult<Vec<String>> {
            let mut keys = self.0.list(prefix)?;
            if !self.1.load(Ordering::SeqCst) {
                return Ok(keys);
            }
            keys.push("instances/i/wal/00000001/000000010000000000000009".into());
            keys.push("instances/i/backups/gone.manifest".into());
            keys.sort();
            Ok(keys)
        }
        fn list_sizes(&self, prefix: &str) -> storage::StorageResult<Vec<ObjectSize>> {
            self.0.list_sizes(prefix)
        }
        fn delete(&self, key: &str) -> storage::StorageResult<()> {
            self.0.delete(key)
        }
        fn exists(&self, key: &str) -> storage::StorageResult<bool> {
            self.0.exists(key)
        }
        fn describe(&self) -> String {
            "vanishing".into()
        }
    }

    /// Objects deleted between a verify's listing and its reads are not
    /// damage; a damaged object read beside them still is.
    #[test]
    fn objects_deleted_while_a_verify_runs_are_not_problems() {
        let store = Arc::new(Vanishing(MemoryStorage::new(), Default::default()));
        let repo = Repository::open_or_init(store.clone()).unwrap();
        let mut w = repo.block_writer(BlockIndex::default());
        w.add(&noise(4096, 9)).unwrap();
        w.finish().unwrap();
        store.1.store(true, Ordering::SeqCst);
        let report = repo.verify(&|_, _| {}).unwrap();
        assert!(report.is_clean(), "{:?}", report.problems);
        store
            .0
            .put("instances/i/wal/00000001/000000010000000000000008", b"junk")
            .unwrap();
        let report = repo.verify(&|_, _| {}).unwrap();
        assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
        assert!(report.problems[0]
            .object
            .ends_with("000000010000000000000008"));
    }

    #[test]
    fn wal_payload_frames_open_as_one_payload() {
        let (_d, repo) = repo();
        let mut payload = repo.wal_payload().unwrap();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        for piece in data.chunks(70_000) {
            payload.extend(piece).unwrap();
        }
        assert_eq!(payload.len(), data.len());
        assert_eq!(payload.checksum(), repo.wal_checksum(&data));
        let meta = WalSegmentMeta {
            timeline: pg_wal::TimelineId(1),
            segment: "000000010000000000000003".into(),
            begin_lsn: pg_wal::Lsn(0x300_0000),
            end_lsn: pg_wal::Lsn(0x300_0000 + data.len() as u64),
            partial: true,
            checksum: payload.checksum(),
            first_commit: None,
            last_commit: None,
            commit_count: 0,
            min_commit_xid: None,
            max_commit_xid: None,
            restore_points: Vec::new(),
            events: Vec::new(),
            events_omitted: 0,
            stored_at: Utc::now(),
        };
        let key = repo.put_wal_payload("i", &meta, &mut payload).unwrap();
        let (read_meta, read) = repo.read_wal(&key).unwrap();
        assert_eq!(read_meta, meta);
        assert_eq!(read, data);
        // Frames of 70 000 bytes are worth joining into one; the one
        // compression context made every frame, and they decompress whole.
        assert!(payload.frames_too_small());
        assert_eq!(payload.raw().unwrap(), data);
    }

    /// Frames of zstd's window or more are stored as they are; a payload
    /// of one frame never counts as cut small.
    #[test]
    fn wal_payload_frames_of_a_window_are_large_enough() {
        let (_d, repo) = repo();
        let data: Vec<u8> = (0..2 * crate::wal::WHOLE_FRAME_MIN as u32)
            .map(|i| (i % 251) as u8)
            .collect();
        let mut whole = repo.wal_payload().unwrap();
        whole.extend(&data[..1000]).unwrap();
        assert!(!whole.frames_too_small());
        let mut large = repo.wal_payload().unwrap();
        for piece in data.chunks(crate::wal::WHOLE_FRAME_MIN) {
            large.extend(piece).unwrap();
        }
        assert!(!large.frames_too_small());
        assert_eq!(large.raw().unwrap(), data);
        large.extend(&data[..1000]).unwrap();
        assert!(large.frames_too_small());
    }

    fn partial_meta(payload: &WalPayload) -> WalSegmentMeta {
        WalSegmentMeta {
            timeline: pg_wal::TimelineId(1),
            segment: "000000010000000000000003".into(),
            begin_lsn: pg_wal::Lsn(0x300_0000),
            end_lsn: pg_wal::Lsn(0x300_0000 + payload.len() as u64),
            partial: true,
            checksum: payload.checksum(),
            first_commit: None,
            last_commit: None,
            commit_count: payload.len() as u64,
            min_commit_xid: None,
            max_commit_xid: None,
            restore_points: Vec::new(),
            events: Vec::new(),
            events_omitted: 0,
            stored_at: Utc::now(),
        }
    }

    #[test]
    fn partial_tails_join_and_whole_writes_replace_them() {
        let (_d, repo) = repo();
        let data: Vec<u8> = (0..400_000u32).map(|i| (i * 7 % 253) as u8).collect();
        let mut payload = repo.wal_payload().unwrap();
        let tails_of = |repo: &Repository| {
            repo.storage()
                .list("instances/i/wal/00000001/000000010000000000000003.partial.d/")
                .unwrap()
                .len()
        };
        // The prefix written whole, then three tails of new bytes only.
        payload.extend(&data[..100_000]).unwrap();
        let key = repo
            .put_wal_payload("i", &partial_meta(&payload), &mut payload)
            .unwrap();
        for piece in data[100_000..250_000].chunks(50_000) {
            payload.extend(piece).unwrap();
            assert_eq!(payload.unstored_len(), piece.len());
            let from = payload.stored_len();
            let tail_key = repo
                .put_wal_tail("i", &partial_meta(&payload), &mut payload, from)
                .unwrap();
            assert_eq!(tail_key, key, "the catalog keeps naming the partial object");
            assert_eq!(payload.unstored_len(), 0);
        }
        assert_eq!(tails_of(&repo), 3);
        let (meta, read) = repo.read_wal(&key).unwrap();
        assert_eq!(read, &data[..250_000]);
        assert_eq!(meta.end_lsn, pg_wal::Lsn(0x300_0000 + 250_000));
        assert_eq!(meta.begin_lsn, pg_wal::Lsn(0x300_0000));
        assert_eq!(meta.commit_count, 250_000, "the newest piece's summary");
        assert_eq!(meta.checksum, repo.wal_checksum(&data[..250_000]));

        // A tail missing in the middle: only the contiguous prefix is read.
        repo.storage()
            .delete(&format!(
                "{key}.d/{:016X}-{:016X}",
                0x300_0000 + 150_000,
                0x300_0000 + 200_000
            ))
            .unwrap();
        assert_eq!(repo.read_wal(&key).unwrap().1, &data[..150_000]);

        // The prefix written whole again replaces the tails it covers.
        payload.extend(&data[250_000..]).unwrap();
        repo.put_wal_payload("i", &partial_meta(&payload), &mut payload)
            .unwrap();
        assert_eq!(tails_of(&repo), 0);
        assert_eq!(repo.read_wal(&key).unwrap().1, data);

        // A tail from an earlier frame merges the tails it covers.
        payload.extend(b"more").unwrap();
        repo.put_wal_tail("i", &partial_meta(&payload), &mut payload, data.len())
            .unwrap();
        payload.extend(b" and more").unwrap();
        repo.put_wal_tail("i", &partial_meta(&payload), &mut payload, data.len() + 4)
            .unwrap();
        assert_eq!(tails_of(&repo), 2);
        repo.put_wal_tail("i", &partial_meta(&payload), &mut payload, data.len())
            .unwrap();
        assert_eq!(tails_of(&repo), 1);
        let (meta, read) = repo.read_wal(&key).unwrap();
        assert_eq!(&read[data.len()..], b"more and more");
        assert_eq!(meta.checksum, repo.wal_checksum(&read));
        // Not where a frame begins, or past what is stored: refused.
        payload.extend(b"!").unwrap();
        assert!(repo
            .put_wal_tail("i", &partial_meta(&payload), &mut payload, data.len() + 1)
            .is_err());

        // Deleting the partial object deletes its tails with it.
        repo.delete_wal(&key).unwrap();
        assert_eq!(tails_of(&repo), 0);
        assert!(!repo.storage().exists(&key).unwrap());
    }

    #[test]
    fn a_tail_that_lies_about_its_range_is_corrupt() {
        let (_d, repo) = repo();
        let mut payload = repo.wal_payload().unwrap();
        payload.extend(&[1u8; 1000]).unwrap();
        let key = repo
            .put_wal_payload("i", &partial_meta(&payload), &mut payload)
            .unwrap();
        payload.extend(&[2u8; 1000]).unwrap();
        repo.put_wal_tail("i", &partial_meta(&payload), &mut payload, 1000)
            .unwrap();
        let tail = repo.storage().list(&format!("{key}.d/")).unwrap().remove(0);
        let bytes = repo.storage().get(&tail).unwrap();
        // The same object under a key that claims one byte more.
        repo.storage().delete(&tail).unwrap();
        repo.storage()
            .put(
                &format!(
                    "{key}.d/{:016X}-{:016X}",
                    0x300_0000 + 1000,
                    0x300_0000 + 2001
                ),
                &bytes,
            )
            .unwrap();
        let err = repo.read_wal(&key).unwrap_err();
        assert!(matches!(err, RepoError::Corrupt { .. }), "{err}");
    }

    /// Tails' meta describes the prefix they end (its checksum is the
    /// prefix's); tails written as they first were, describing their own
    /// bytes, still join; a tail whose prefix checksum does not match what
    /// the prefix holds is corrupt.
    #[test]
    fn tails_carry_the_prefix_checksum_and_old_tails_still_join() {
        let (_d, repo) = repo();
        let data: Vec<u8> = (0..30_000u32).map(|i| (i * 13 % 251) as u8).collect();
        let mut payload = repo.wal_payload().unwrap();
        payload.extend(&data[..10_000]).unwrap();
        let key = repo
            .put_wal_payload("i", &partial_meta(&payload), &mut payload)
            .unwrap();
        let tail_at = |from: u64, to: u64| {
            format!(
                "{key}.d/{:016X}-{:016X}",
                0x300_0000 + from,
                0x300_0000 + to
            )
        };
        // Stores `raw` as the tail from..to, sealed (as any writer of the
        // repository could) with `meta`.
        let put_tail = |from: u64, to: u64, meta: &WalSegmentMeta, raw: &[u8]| {
            let frames = zstd::bulk::compress(raw, 1).unwrap();
            let sealed =
                crate::object::seal_compressed(&repo.keys, ObjectKind::WalSegment, meta, &frames)
                    .unwrap();
            repo.storage().put(&tail_at(from, to), &sealed).unwrap();
        };
        let open_tail = |k: &str| {
            let bytes = repo.storage().get(k).unwrap();
            crate::object::open::<WalSegmentMeta>(&repo.keys, k, ObjectKind::WalSegment, &bytes)
                .unwrap()
        };

        // A tail as written before: its own range, its own bytes' checksum.
        let mut old_meta = partial_meta(&payload);
        old_meta.begin_lsn = pg_wal::Lsn(0x300_0000 + 10_000);
        old_meta.end_lsn = pg_wal::Lsn(0x300_0000 + 20_000);
        old_meta.checksum = repo.wal_checksum(&data[10_000..20_000]);
        old_meta.commit_count = 20_000;
        put_tail(10_000, 20_000, &old_meta, &data[10_000..20_000]);

        // The writer continues from there: a tail of the prefix's checksum.
        payload.extend(&data[10_000..20_000]).unwrap();
        payload.mark_stored();
        payload.extend(&data[20_000..]).unwrap();
        let meta = partial_meta(&payload);
        repo.put_wal_tail("i", &meta, &mut payload, 20_000).unwrap();
        let new_tail = open_tail(&tail_at(20_000, 30_000));
        assert_eq!(new_tail.meta.begin_lsn, pg_wal::Lsn(0x300_0000));
        assert_eq!(new_tail.meta.checksum, repo.wal_checksum(&data));
        assert_eq!(new_tail.payload, &data[20_000..]);

        let (read_meta, read) = repo.read_wal(&key).unwrap();
        assert_eq!(read, data);
        assert_eq!(read_meta.begin_lsn, pg_wal::Lsn(0x300_0000));
        assert_eq!(read_meta.end_lsn, pg_wal::Lsn(0x300_0000 + 30_000));
        assert_eq!(read_meta.checksum, repo.wal_checksum(&data));
        let report = repo.verify(&|_, _| {}).unwrap();
        assert!(report.is_clean(), "{:?}", report.problems);

        // The old tail's bytes replaced by others under a valid seal and
        // their own checksum: the new tail's prefix checksum finds it.
        let mut other = data[10_000..20_000].to_vec();
        other[5] ^= 1;
        let mut forged = old_meta.clone();
        forged.checksum = repo.wal_checksum(&other);
        put_tail(10_000, 20_000, &forged, &other);
        match repo.read_wal(&key) {
            Err(RepoError::Corrupt { object, reason }) => {
                assert_eq!(object, tail_at(20_000, 30_000));
                assert!(reason.contains("up to the tail's end"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        let report = repo.verify(&|_, _| {}).unwrap();
        assert_eq!(
            report
                .problems
                .iter()
                .map(|p| &*p.object)
                .collect::<Vec<_>>(),
            [key.as_str()],
            "{:?}",
            report.problems
        );
        // A prefix tail that names another start than the prefix's is corrupt too.
        let mut shifted = new_tail.meta.clone();
        shifted.begin_lsn = pg_wal::Lsn(0x300_0000 + 1);
        put_tail(20_000, 30_000, &shifted, &data[20_000..]);
        put_tail(10_000, 20_000, &old_meta, &data[10_000..20_000]);
        let err = repo.read_wal(&key).unwrap_err();
        assert!(
            matches!(&err, RepoError::Corrupt { reason, .. } if reason.contains("its key names")),
            "{err}"
        );
    }

    #[test]
    fn an_instance_record_under_another_instances_key_is_refused() {
        let (_d, repo) = repo();
        let rec = |id: &str| InstanceRecord {
            id: id.into(),
            host: format!("{id}.example"),
            port: 5432,
            user: "strata".into(),
            dbname: None,
            sslmode: "verify-full".into(),
            password_env: Some(format!("PW_{id}")),
            created_at: Utc::now(),
        };
        repo.put_instance(&rec("a")).unwrap();
        repo.put_instance(&rec("b")).unwrap();
        assert_eq!(repo.read_instance("b").unwrap().unwrap().host, "b.example");
        // a's record, sealed and valid, moved to b's key.
        let a = repo.storage().get(&instance_key("a")).unwrap();
        repo.storage().put(&instance_key("b"), &a).unwrap();
        for err in [
            repo.read_instance("b").unwrap_err(),
            repo.list_instances().unwrap_err(),
        ] {
            match err {
                RepoError::Corrupt { object, reason } => {
                    assert_eq!(object, instance_key("b"));
                    assert!(reason.contains("instance a under another key"), "{reason}");
                }
                other => panic!("{other:?}"),
            }
        }
        let report = repo.verify(&|_, _| {}).unwrap();
        assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
    }

    #[test]
    fn refuses_newer_format() {
        let (dir, repo) = repo();
        let mut cfg = repo.config().clone();
        cfg.format_version = FORMAT_VERSION + 1;
        std::fs::write(
            dir.path().join("repo").join(CONFIG_KEY),
            serde_json::to_vec(&cfg).unwrap(),
        )
        .unwrap();
        let storage = Arc::new(LocalStorage::new(dir.path().join("repo")).unwrap());
        let err = Repository::open(storage).unwrap_err();
        assert!(matches!(err, RepoError::NewerFormat { .. }), "{err}");
    }

    fn key_file(dir: &std::path::Path, name: &str) -> KeySource {
        let path = dir.join(name);
        std::fs::write(
            &path,
            format!("{}\n", hex::encode(rand::random::<[u8; 32]>())),
        )
        .unwrap();
        KeySource::KeyFile(path)
    }

    #[test]
    fn encrypted_repository_round_trip_rotation_and_wrong_keys() {
        let dir = tempfile::tempdir().unwrap();
        let storage: Arc<dyn Storage> =
            Arc::new(LocalStorage::new(dir.path().join("repo")).unwrap());
        let first = key_file(dir.path(), "first");
        let repo = Repository::open_or_init_with_key(storage.clone(), Some(&first)).unwrap();
        assert!(repo.is_encrypted());
        assert_eq!(repo.config().format_version, FORMAT_VERSION_ENCRYPTED);
        let config_text = String::from_utf8(storage.get(CONFIG_KEY).unwrap()).unwrap();
        assert!(!config_text.contains("hash_key"), "{config_text}");

        let block: Vec<u8> = b"row data that must not be readable ".repeat(200);
        let mut w = repo.block_writer(BlockIndex::default());
        let r = w.add(&block).unwrap();
        w.finish().unwrap();
        repo.put_instance(&InstanceRecord {
            id: "db1".into(),
            host: "secret-host.example".into(),
            port: 5432,
            user: "backup".into(),
            dbname: None,
            sslmode: "prefer".into(),
            password_env: None,
            created_at: Utc::now(),
        })
        .unwrap();
        // Nothing readable at rest.
        for key in storage.list("").unwrap() {
            let bytes = storage.get(&key).unwrap();
            assert!(!bytes.windows(8).any(|w| w == b"row data"), "{key}");
            assert!(!bytes.windows(11).any(|w| w == b"secret-host"), "{key}");
        }
        assert!(repo.verify(&|_, _| {}).unwrap().is_clean());

        // No key, a wrong key, a key for a plain repository: clear refusals.
        let err = Repository::open(storage.clone()).unwrap_err();
        assert!(err.to_string().contains("is encrypted"), "{err}");
        let wrong = key_file(dir.path(), "wrong");
        let err = Repository::open_with_key(storage.clone(), Some(&wrong)).unwrap_err();
        assert!(matches!(err, RepoError::WrongKey { .. }), "{err}");

        // Rotation: the new key opens it and reads the old blocks; the old key no longer does.
        let mut repo = repo;
        let second = KeySource::Passphrase(zeroize::Zeroizing::new("a long passphrase".into()));
        let before = storage.list("packs").unwrap();
        repo.rotate_key(&second).unwrap();
        assert_eq!(storage.list("packs").unwrap(), before);
        let reopened = Repository::open_with_key(storage.clone(), Some(&second)).unwrap();
        assert_eq!(reopened.read_block(&r).unwrap(), block);
        assert_eq!(
            reopened.list_instances().unwrap()[0].host,
            "secret-host.example"
        );
        let err = Repository::open_with_key(storage.clone(), Some(&first)).unwrap_err();
        assert!(err.to_string().contains("passphrase"), "{err}");

        let plain_dir = tempfile::tempdir().unwrap();
        let plain: Arc<dyn Storage> = Arc::new(LocalStorage::new(plain_dir.path()).unwrap());
        Repository::open_or_init(plain.clone()).unwrap();
        let err = Repository::open_with_key(plain, Some(&first)).unwrap_err();
        assert!(err.to_string().contains("is not encrypted"), "{err}");
    }

    fn domain_keys(repo: &Repository, domain: u32, byte: u8) -> Keys {
        Keys::instance_domain(
            KeyDomain(domain),
            zeroize::Zeroizing::new([byte; 32]),
            repo.repository_keys(),
        )
        .unwrap()
    }

    #[test]
    fn instance_key_domain_seals_its_own_packs_and_objects() {
        let (_dir, repo) = repo();
        // Written before the domain existed: repository keys, format unchanged.
        let old_block = b"older block, repository keys ".repeat(100);
        let mut w = repo.block_writer(BlockIndex::default());
        let old_ref = w.add(&old_block).unwrap();
        w.finish().unwrap();
        let old_obj = seal(&repo.keys, ObjectKind::Instance, &1u32, b"", None).unwrap();
        assert_eq!(&old_obj[8..10], &[1, 0]);

        let domain = repo.in_domain(domain_keys(&repo, 0x0a0b0c0d, 7));
        let block = b"PLAINTEXT-MARKER in an instance domain ".repeat(100);
        let mut w = domain.block_writer(BlockIndex::default());
        let r = w.add(&block).unwrap();
        w.finish().unwrap();
        assert_ne!(
            r.hash,
            repo.hasher().hash(&block),
            "instance blocks hash under the instance's key"
        );
        let obj = seal(
            &domain.keys,
            ObjectKind::Manifest,
            &"meta",
            b"payload",
            None,
        )
        .unwrap();
        assert_eq!(&obj[8..10], &[3, 0]);
        assert_eq!(object::object_domain(&obj), (KeyDomain(0x0a0b0c0d), 16));
        let pack_key = pack_key(&r.pack);
        let pack_bytes = repo.storage().get(&pack_key).unwrap();
        assert_eq!(&pack_bytes[8..10], &[3, 0]);
        assert_eq!(pack::pack_domain(&pack_bytes), Some(KeyDomain(0x0a0b0c0d)));
        assert!(!pack_bytes.windows(16).any(|w| w == b"PLAINTEXT-MARKER"));

        // The domain reads its own and the repository's objects.
        assert_eq!(domain.read_block(&r).unwrap(), block);
        assert_eq!(domain.read_block(&old_ref).unwrap(), old_block);
        assert_eq!(
            domain.in_repository_domain().read_block(&old_ref).unwrap(),
            old_block
        );
        assert_eq!(
            open::<String>(&domain.keys, "m", ObjectKind::Manifest, &obj)
                .unwrap()
                .payload,
            b"payload"
        );
        assert_eq!(
            open::<u32>(&domain.keys, "i", ObjectKind::Instance, &old_obj)
                .unwrap()
                .meta,
            1
        );
        assert!(domain.verify(&|_, _| {}).unwrap().is_clean());

        // The repository's keys do not open the domain's objects: a clear refusal.
        let err = open::<String>(&repo.keys, "m", ObjectKind::Manifest, &obj)
            .err()
            .unwrap();
        assert!(matches!(err, RepoError::DomainLocked { .. }), "{err}");
        let report = repo.verify(&|_, _| {}).unwrap();
        assert!(!report.is_clean());
        assert!(repo.read_block(&r).is_err());

        // The same domain id under another data key fails authentication.
        let wrong = domain_keys(&repo, 0x0a0b0c0d, 8);
        let err = open::<String>(&wrong, "m", ObjectKind::Manifest, &obj)
            .err()
            .unwrap();
        assert!(matches!(err, RepoError::Corrupt { .. }), "{err}");
        assert!(pack::verify_pack(&wrong, &pack_key, &pack_bytes).is_err());
        assert!(repo.in_domain(wrong).read_block(&r).is_err());
        // A header naming another domain is refused before any key is tried.
        let mut moved = obj.clone();
        moved[12] ^= 1;
        let err = open::<String>(&domain.keys, "m", ObjectKind::Manifest, &moved)
            .err()
            .unwrap();
        assert!(matches!(err, RepoError::DomainLocked { .. }), "{err}");
    }

    #[test]
    fn read_domains_open_every_unlocked_domain_and_write_in_their_own() {
        let (_dir, repo) = repo();
        let mut w = repo.block_writer(BlockIndex::default());
        let plain_block = b"repository block ".repeat(100);
        let plain_ref = w.add(&plain_block).unwrap();
        w.finish().unwrap();
        let a = repo.in_domain(domain_keys(&repo, 0xa, 1));
        let b = repo.in_domain(domain_keys(&repo, 0xb, 2));
        let mut written = Vec::new();
        for (i, d) in [&a, &b].into_iter().enumerate() {
            let block = format!("instance {i} block ").repeat(100).into_bytes();
            let mut w = d.block_writer(BlockIndex::default());
            let r = w.add(&block).unwrap();
            w.finish().unwrap();
            written.push((r, block));
        }
        // The repository alone opens neither instance's packs.
        assert!(repo.read_block(&written[0].0).is_err());
        assert!(!repo.verify(&|_, _| {}).unwrap().is_clean());

        let all =
            repo.with_read_domains(vec![a.domain_keys(), b.domain_keys(), repo.domain_keys()]);
        assert_eq!(all.domain(), KeyDomain::REPOSITORY);
        assert_eq!(
            all.domain_keys().read_domains(),
            vec![KeyDomain(0xa), KeyDomain(0xb)]
        );
        for (r, block) in &written {
            assert_eq!(&all.read_block(r).unwrap(), block);
        }
        assert_eq!(all.read_block(&plain_ref).unwrap(), plain_block);
        assert!(all.verify(&|_, _| {}).unwrap().is_clean());

        // Only one of them unlocked: the other stays a clear refusal.
        let only_a = repo.with_read_domains(vec![a.domain_keys()]);
        assert_eq!(only_a.read_block(&written[0].0).unwrap(), written[0].1);
        let obj = seal(&b.keys, ObjectKind::Manifest, &"m", b"p", None).unwrap();
        let err = open::<String>(&only_a.keys, "m", ObjectKind::Manifest, &obj)
            .err()
            .unwrap();
        assert!(matches!(err, RepoError::DomainLocked { .. }), "{err}");

        // An instance domain built on the multi-domain keys reads only its own
        // and the repository's, and writes its own.
        let c = all.in_domain(domain_keys(&all, 0xc, 3));
        assert!(c.read_block(&written[0].0).is_err());
        assert_eq!(c.read_block(&plain_ref).unwrap(), plain_block);
        // A reader in an instance domain writes there and reads the others.
        let a_all = a.with_read_domains(vec![b.domain_keys()]);
        assert_eq!(a_all.domain(), KeyDomain(0xa));
        assert_eq!(a_all.read_block(&written[1].0).unwrap(), written[1].1);
        assert_eq!(a_all.read_block(&plain_ref).unwrap(), plain_block);
    }

    #[test]
    fn unencrypted_repositories_stay_format_version_1() {
        let (dir, repo) = repo();
        assert_eq!(repo.config().format_version, 1);
        let text = std::fs::read_to_string(dir.path().join("repo").join(CONFIG_KEY)).unwrap();
        assert!(
            text.contains("hash_key") && !text.contains("encryption"),
            "{text}"
        );
    }
}
