//! An instance's key record: the data key of its key domain, wrapped by a
//! customer master key (CMK) of a key management service, and what is needed
//! to unwrap it again. The plaintext data key is never stored; it exists only
//! in memory after the KMS decrypted the wrapped one. The record is plain JSON
//! (it holds nothing secret) at `instances/<instance>/encryption-key.json`;
//! format in docs/REPOSITORY.md ("Instance key domains").

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::crypto::KeyDomain;
use crate::{RepoError, RepoResult, Repository, StorageError};

/// Version of the key record this build writes and reads.
pub const KEY_RECORD_VERSION: u32 = 1;

/// One instance's KMS-wrapped data key.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct InstanceKeyRecord {
    /// [`KEY_RECORD_VERSION`].
    pub format_version: u32,
    /// The instance.
    pub instance_id: String,
    /// The domain id in the headers of the instance's packs and objects.
    pub key_domain: KeyDomain,
    /// The CMK as the KMS names it (its ARN when the KMS answered one).
    pub kms_key_id: String,
    /// Hex of the KMS ciphertext of the data key (opaque to Strata).
    pub wrapped_key: String,
    /// When the data key was generated.
    pub created_at: DateTime<Utc>,
    /// 1 at creation, +1 each time the data key is re-wrapped.
    pub key_version: u32,
    /// When it was last re-wrapped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotated_at: Option<DateTime<Utc>>,
}

/// Longest KMS key id (an ARN of an alias is at most 2048 characters).
const MAX_KMS_KEY_ID_LEN: usize = 2048;
/// Longest wrapped data key, in hex (a KMS ciphertext blob is at most 6144 bytes).
const MAX_WRAPPED_KEY_HEX_LEN: usize = 2 * 6144;

/// Key of an instance's key record.
pub fn key_record_key(instance_id: &str) -> String {
    format!("instances/{instance_id}/encryption-key.json")
}

impl InstanceKeyRecord {
    /// The wrapped data key's bytes.
    pub fn wrapped_bytes(&self) -> RepoResult<Vec<u8>> {
        hex::decode(&self.wrapped_key).map_err(|e| RepoError::Corrupt {
            object: key_record_key(&self.instance_id),
            reason: format!("wrapped_key: {e}"),
        })
    }
}

impl Repository {
    /// Stores an instance's key record (replacing an older one).
    pub fn put_key_record(&self, rec: &InstanceKeyRecord) -> RepoResult<()> {
        let bytes = serde_json::to_vec_pretty(rec).map_err(|e| RepoError::Format(e.to_string()))?;
        self.storage
            .put(&key_record_key(&rec.instance_id), &bytes)?;
        Ok(())
    }

    /// Every instance key record in the store, registered or detached
    /// instances alike, by instance id.
    pub fn list_key_records(&self) -> RepoResult<Vec<InstanceKeyRecord>> {
        let mut records = Vec::new();
        for key in self.storage.list("instances/")? {
            let Some(instance_id) = key
                .strip_prefix("instances/")
                .and_then(|k| k.strip_suffix("/encryption-key.json"))
                .filter(|id| !id.contains('/'))
            else {
                continue;
            };
            if let Some(rec) = self.read_key_record(instance_id)? {
                records.push(rec);
            }
        }
        records.sort_by(|a, b| a.instance_id.cmp(&b.instance_id));
        Ok(records)
    }

    /// An instance's key record; `None` when its backups use the repository's keys.
    pub fn read_key_record(&self, instance_id: &str) -> RepoResult<Option<InstanceKeyRecord>> {
        let key = key_record_key(instance_id);
        let bytes = match self.storage.get(&key) {
            Ok(b) => b,
            Err(StorageError::NotFound(_)) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let corrupt = |reason: String| RepoError::Corrupt {
            object: key.clone(),
            reason,
        };
        let raw: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
        let version = raw
            .get("format_version")
            .and_then(|v| v.as_u64())
            .unwrap_or(0) as u32;
        if version > KEY_RECORD_VERSION {
            return Err(RepoError::NewerFormat {
                found: version,
                supported: KEY_RECORD_VERSION,
            });
        }
        let rec: InstanceKeyRecord =
            serde_json::from_value(raw).map_err(|e| corrupt(e.to_string()))?;
        if rec.instance_id != instance_id || rec.key_domain == KeyDomain::REPOSITORY {
            return Err(corrupt(format!(
                "names instance {:?} and key domain {}",
                rec.instance_id, rec.key_domain
            )));
        }
        // Both go to the KMS, into answers and log lines: ids as KMS spells
        // them (ARNs, aliases, UUIDs), a ciphertext of a KMS's size.
        let id_ok = !rec.kms_key_id.is_empty()
            && rec.kms_key_id.len() <= MAX_KMS_KEY_ID_LEN
            && rec
                .kms_key_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b":/_-.".contains(&b));
        if !id_ok {
            return Err(corrupt("names a KMS key id that no KMS issues".into()));
        }
        if rec.wrapped_key.is_empty()
            || rec.wrapped_key.len() > MAX_WRAPPED_KEY_HEX_LEN
            || !rec.wrapped_key.bytes().all(|b| b.is_ascii_hexdigit())
        {
            return Err(corrupt(
                "holds a wrapped key that is not a KMS ciphertext in hex".into(),
            ));
        }
        Ok(Some(rec))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::storage::Storage;
    use crate::LocalStorage;

    #[test]
    fn hostile_key_records_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Arc::new(LocalStorage::new(dir.path().join("repo")).unwrap());
        let repo = Repository::open_or_init(storage.clone()).unwrap();
        let good = InstanceKeyRecord {
            format_version: KEY_RECORD_VERSION,
            instance_id: "db1".into(),
            key_domain: KeyDomain(7),
            kms_key_id:
                "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab".into(),
            wrapped_key: "00ff".repeat(46),
            created_at: Utc::now(),
            key_version: 1,
            rotated_at: None,
        };
        repo.put_key_record(&good).unwrap();
        assert_eq!(
            repo.read_key_record("db1").unwrap().unwrap().kms_key_id,
            good.kms_key_id
        );
        let key = key_record_key("db1");
        let write = |rec: serde_json::Value| storage.put(&key, rec.to_string().as_bytes()).unwrap();
        let base = serde_json::to_value(&good).unwrap();
        let with = |field: &str, value: serde_json::Value| {
            let mut v = base.clone();
            v[field] = value;
            v
        };
        for (what, rec) in [
            ("another instance", with("instance_id", "db2".into())),
            ("the repository's domain", with("key_domain", 0.into())),
            ("a quote", with("kms_key_id", "alias/a\"b".into())),
            ("a newline", with("kms_key_id", "alias/a\nb".into())),
            ("an equals sign", with("kms_key_id", "alias/a=b".into())),
            ("an empty id", with("kms_key_id", "".into())),
            (
                "a 2049-byte id",
                with("kms_key_id", "k".repeat(2049).into()),
            ),
            ("a key not in hex", with("wrapped_key", "zz".into())),
            ("an empty key", with("wrapped_key", "".into())),
            (
                "a 6145-byte key",
                with("wrapped_key", "00".repeat(6145).into()),
            ),
        ] {
            write(rec);
            let err = repo.read_key_record("db1").unwrap_err();
            assert!(matches!(err, RepoError::Corrupt { .. }), "{what}: {err}");
        }
        write(with("format_version", (KEY_RECORD_VERSION + 1).into()));
        assert!(matches!(
            repo.read_key_record("db1").unwrap_err(),
            RepoError::NewerFormat { .. }
        ));
    }
}
