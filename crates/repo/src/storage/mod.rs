//! The storage backend the repository is written to.
//!
//! A deliberately small trait (put / get / ranged get / list / delete) so the
//! repository logic never knows whether it talks to a local directory or an
//! object store (the restic backend pattern). `put` must be atomic: a reader
//! either sees the whole object or nothing, which is what makes "manifest
//! written last" a commit point.
//!
//! Backends: [`LocalStorage`] (a directory), [`S3Storage`] (any
//! S3-compatible service), [`AzureStorage`] (Azure Blob Storage) and
//! [`GcsStorage`] (Google Cloud Storage), the last three through the
//! `object_store` crate. [`RetryingStorage`]
//! wraps any of them and retries what [`StorageError::is_transient`] calls
//! transient; it is the only place a storage call is retried.

mod azure;
mod cloud;
mod gcs;
mod local;
mod memory;
mod retry;
mod s3;
mod s3api;
mod space;

#[cfg(feature = "fault-injection")]
pub mod fault;

use std::time::Duration;

use bytes::Bytes;
use thiserror::Error;

pub use azure::{AzureConfig, AzureStorage};
pub use cloud::Tuning;
pub use gcs::{GcsConfig, GcsStorage};
pub use local::LocalStorage;
pub use memory::MemoryStorage;
pub use retry::{RetryPolicy, RetryingStorage};
pub use s3::{ObjectLock, S3Config, S3Storage};
pub use s3api::LockMode;
pub use space::MinFreeSpace;

/// What a store can fail with; [`StorageError::is_transient`] decides retries.
#[derive(Debug, Error)]
pub enum StorageError {
    /// No object has that key.
    #[error("object {0} not found")]
    NotFound(String),
    /// A key that is not a safe relative path.
    #[error("invalid object key {0:?}")]
    InvalidKey(String),
    /// A local file system call failed.
    #[error("I/O error on {key}: {source}")]
    Io {
        /// Key of the object.
        key: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A ranged read asked for bytes past the end of the object.
    #[error("{key}: wanted {len} bytes at offset {offset}, the object is shorter")]
    ShortRead {
        /// Key of the object.
        key: String,
        /// Offset asked for.
        offset: u64,
        /// Bytes asked for.
        len: u64,
    },
    /// The object store refused or failed a request. `transient` is decided
    /// where the answer is decoded (HTTP status, transport error kind).
    #[error("{op} {key}: {message}")]
    Remote {
        /// The request (`GET`, `PUT`…).
        op: &'static str,
        /// Key of the object.
        key: String,
        /// What the store answered.
        message: String,
        /// Whether retrying may succeed.
        transient: bool,
    },
    /// The call did not finish in time; it may or may not have taken effect.
    #[error("{op} {key}: no answer within {after:?}")]
    Timeout {
        /// The request.
        op: &'static str,
        /// Key of the object.
        key: String,
        /// How long it waited.
        after: Duration,
    },
    /// The backend cannot be set up as configured (bad URL, missing
    /// credentials); retrying does not help.
    #[error("storage configuration: {0}")]
    Config(String),
    /// The store refuses to delete the object: an Object Lock retention
    /// holds it until `until` (when the store said).
    #[error("{key} is kept by Object Lock{}", .until.map(|u| format!(" until {}", u.to_rfc3339())).unwrap_or_default())]
    Locked {
        /// Key of the object.
        key: String,
        /// The retain-until date.
        until: Option<chrono::DateTime<chrono::Utc>>,
    },
    /// The store refuses to delete the object, and no Object Lock
    /// retention it shows explains it: a legal hold, a missing delete
    /// permission, or a retention the credentials may not read. Kept, like
    /// a locked object, and tried again later.
    #[error("{key} cannot be deleted: {reason}")]
    DeleteRefused {
        /// Key of the object.
        key: String,
        /// What the store showed of why.
        reason: String,
    },
    /// A write through a read-only view of the repository.
    #[error("{op} {key} refused: {why}")]
    ReadOnly {
        /// The request.
        op: &'static str,
        /// Key of the object.
        key: String,
        /// Which view refuses it.
        why: String,
    },
    /// A local repository's file system would keep less free space than
    /// the configured minimum after this write; nothing was written.
    #[error(
        "writing {key} ({}) refused: the repository's file system has {} free, below the minimum {}",
        space::human(*.needed), space::human(*.free), space::human(*.minimum)
    )]
    BelowMinFree {
        /// Key of the object.
        key: String,
        /// Bytes the write needs.
        needed: u64,
        /// Bytes free now.
        free: u64,
        /// The minimum to keep free.
        minimum: u64,
    },
}

impl StorageError {
    /// The store keeps the object against a delete ([`StorageError::Locked`]
    /// or [`StorageError::DeleteRefused`]): what deletes leaves it for a
    /// later pass instead of failing.
    pub fn is_kept(&self) -> bool {
        matches!(
            self,
            StorageError::Locked { .. } | StorageError::DeleteRefused { .. }
        )
    }

    /// Whether retrying the same call may succeed. This is the one place that
    /// decides: [`RetryingStorage`] retries exactly these, and callers that
    /// reconnect (WAL receivers) ask the same question through the engine.
    pub fn is_transient(&self) -> bool {
        match self {
            StorageError::Io { source, .. } => matches!(
                source.kind(),
                std::io::ErrorKind::Interrupted | std::io::ErrorKind::TimedOut
            ),
            StorageError::Remote { transient, .. } => *transient,
            StorageError::Timeout { .. } => true,
            StorageError::NotFound(_)
            | StorageError::InvalidKey(_)
            | StorageError::ShortRead { .. }
            | StorageError::Config(_)
            | StorageError::Locked { .. }
            | StorageError::DeleteRefused { .. }
            | StorageError::ReadOnly { .. }
            | StorageError::BelowMinFree { .. } => false,
        }
    }
}

/// What store calls return.
pub type StorageResult<T> = Result<T, StorageError>;

/// One object of a listing with its size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectSize {
    /// Object key.
    pub key: String,
    /// Size in bytes.
    pub size: u64,
}

/// An object store keyed by `/`-separated relative paths.
pub trait Storage: Send + Sync + std::fmt::Debug {
    /// Stores `data` under `key`, replacing any previous object atomically.
    fn put(&self, key: &str, data: &[u8]) -> StorageResult<()>;
    /// [`Storage::put`] taking the bytes by value, so a backend that hands
    /// them to another task (S3) needs no copy of a 17 MB pack.
    fn put_bytes(&self, key: &str, data: Bytes) -> StorageResult<()> {
        self.put(key, &data)
    }
    /// How many large objects (packs) a writer should store at once. A
    /// request to an object store mostly waits on the network and the
    /// service, so several in flight hide that; a local disk gains little
    /// past two. Each one in flight holds a pack buffer in memory.
    fn concurrent_puts(&self) -> usize {
        1
    }
    /// How many ranged reads one reader of a file keeps in flight (see
    /// [`crate::Repository::read_blocks`]). A disk answers in microseconds:
    /// one read ahead of the one being decoded is enough. An object store
    /// answers each in tens of milliseconds, so a file read one request at
    /// a time waits most of the time. Each read in flight holds up to
    /// [`crate::READ_RUN_MAX`] bytes.
    fn concurrent_reads(&self) -> usize {
        1
    }
    /// The whole object; [`StorageError::NotFound`] when absent.
    fn get(&self, key: &str) -> StorageResult<Vec<u8>>;
    /// Exactly `len` bytes from `offset`; [`StorageError::ShortRead`] when the
    /// object ends sooner.
    fn get_range(&self, key: &str, offset: u64, len: u64) -> StorageResult<Vec<u8>>;
    /// Keys under the directory `prefix` (recursively; `""` = everything),
    /// sorted. `"a"` and `"a/"` both mean the keys starting with `a/`.
    fn list(&self, prefix: &str) -> StorageResult<Vec<String>>;
    /// The same listing with each object's size in bytes (what the store
    /// holds, i.e. what it bills).
    fn list_sizes(&self, prefix: &str) -> StorageResult<Vec<ObjectSize>>;
    /// Removes `key`; removing an absent key is not an error.
    fn delete(&self, key: &str) -> StorageResult<()>;
    /// True when an object has that key.
    fn exists(&self, key: &str) -> StorageResult<bool>;
    /// Protects `key` for the store's whole retention window from now on,
    /// when the store keeps objects under a retention (S3 Object Lock): a
    /// pack a new backup set references again must outlive that set.
    /// Nothing to do elsewhere.
    fn retain(&self, _key: &str) -> StorageResult<()> {
        Ok(())
    }
    /// Human-readable location, for messages.
    fn describe(&self) -> String;
}

/// A shared backend is a backend, so wrappers (retries, fault injection) can
/// be stacked over one store that is also used directly.
impl<S: Storage + ?Sized> Storage for std::sync::Arc<S> {
    fn put(&self, key: &str, data: &[u8]) -> StorageResult<()> {
        (**self).put(key, data)
    }
    fn put_bytes(&self, key: &str, data: Bytes) -> StorageResult<()> {
        (**self).put_bytes(key, data)
    }
    fn concurrent_puts(&self) -> usize {
        (**self).concurrent_puts()
    }
    fn concurrent_reads(&self) -> usize {
        (**self).concurrent_reads()
    }
    fn get(&self, key: &str) -> StorageResult<Vec<u8>> {
        (**self).get(key)
    }
    fn get_range(&self, key: &str, offset: u64, len: u64) -> StorageResult<Vec<u8>> {
        (**self).get_range(key, offset, len)
    }
    fn list(&self, prefix: &str) -> StorageResult<Vec<String>> {
        (**self).list(prefix)
    }
    fn list_sizes(&self, prefix: &str) -> StorageResult<Vec<ObjectSize>> {
        (**self).list_sizes(prefix)
    }
    fn delete(&self, key: &str) -> StorageResult<()> {
        (**self).delete(key)
    }
    fn exists(&self, key: &str) -> StorageResult<bool> {
        (**self).exists(key)
    }
    fn retain(&self, key: &str) -> StorageResult<()> {
        (**self).retain(key)
    }
    fn describe(&self) -> String {
        (**self).describe()
    }
}

/// Keys are relative `/`-separated paths without empty, `.` or `..` parts,
/// on every backend, so a repository can move between them.
pub(crate) fn validate_key(key: &str) -> StorageResult<()> {
    let valid = !key.is_empty()
        && !key.starts_with('/')
        && key
            .split('/')
            .all(|part| !part.is_empty() && part != "." && part != "..");
    if valid {
        Ok(())
    } else {
        Err(StorageError::InvalidKey(key.to_string()))
    }
}

/// An object-store URL's prefix after its slashes were trimmed: a valid key
/// with no control characters, which would end up in request paths and log
/// lines. Empty means the whole bucket or container.
pub(crate) fn validate_prefix(prefix: &str) -> StorageResult<()> {
    if prefix.is_empty() {
        return Ok(());
    }
    validate_key(prefix)?;
    if prefix.chars().any(char::is_control) {
        return Err(StorageError::InvalidKey(prefix.to_string()));
    }
    Ok(())
}

/// A list prefix as a directory key (no trailing `/`), or `None` for the root.
pub(crate) fn list_dir(prefix: &str) -> StorageResult<Option<&str>> {
    let dir = prefix.trim_end_matches('/');
    if dir.is_empty() {
        return Ok(None);
    }
    validate_key(dir)?;
    Ok(Some(dir))
}
