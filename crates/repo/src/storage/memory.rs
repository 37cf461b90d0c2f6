//! A repository held in memory: the `Storage` contract without a file
//! system or a server, for unit tests of the logic above storage
//! (retention, garbage collection, copies) that must run anywhere and fast.

use std::collections::BTreeMap;
use std::sync::Mutex;

use super::{list_dir, validate_key, ObjectSize, Storage, StorageError, StorageResult};

/// Objects in a sorted map, behind a lock.
#[derive(Debug, Default)]
pub struct MemoryStorage {
    objects: Mutex<BTreeMap<String, Vec<u8>>>,
}

impl MemoryStorage {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn objects(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Vec<u8>>> {
        // A panic while holding the lock leaves whole objects: keep going.
        self.objects.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Storage for MemoryStorage {
    fn put(&self, key: &str, data: &[u8]) -> StorageResult<()> {
        validate_key(key)?;
        self.objects().insert(key.to_string(), data.to_vec());
        Ok(())
    }

    fn get(&self, key: &str) -> StorageResult<Vec<u8>> {
        validate_key(key)?;
        self.objects()
            .get(key)
            .cloned()
            .ok_or_else(|| StorageError::NotFound(key.to_string()))
    }

    fn get_range(&self, key: &str, offset: u64, len: u64) -> StorageResult<Vec<u8>> {
        validate_key(key)?;
        let objects = self.objects();
        let data = objects
            .get(key)
            .ok_or_else(|| StorageError::NotFound(key.to_string()))?;
        let short = || StorageError::ShortRead {
            key: key.to_string(),
            offset,
            len,
        };
        let start = usize::try_from(offset).map_err(|_| short())?;
        let end = offset
            .checked_add(len)
            .and_then(|e| usize::try_from(e).ok())
            .ok_or_else(short)?;
        data.get(start..end).map(<[u8]>::to_vec).ok_or_else(short)
    }

    fn list(&self, prefix: &str) -> StorageResult<Vec<String>> {
        Ok(self
            .list_sizes(prefix)?
            .into_iter()
            .map(|o| o.key)
            .collect())
    }

    fn list_sizes(&self, prefix: &str) -> StorageResult<Vec<ObjectSize>> {
        let dir = list_dir(prefix)?.map(|d| format!("{d}/"));
        Ok(self
            .objects()
            .iter()
            .filter(|(k, _)| dir.as_deref().is_none_or(|d| k.starts_with(d)))
            .map(|(k, v)| ObjectSize {
                key: k.clone(),
                size: v.len() as u64,
            })
            .collect())
    }

    fn delete(&self, key: &str) -> StorageResult<()> {
        validate_key(key)?;
        self.objects().remove(key);
        Ok(())
    }

    fn exists(&self, key: &str) -> StorageResult<bool> {
        validate_key(key)?;
        Ok(self.objects().contains_key(key))
    }

    fn describe(&self) -> String {
        "memory".into()
    }
}
