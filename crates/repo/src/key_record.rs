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
        Ok(Some(rec))
    }
}
