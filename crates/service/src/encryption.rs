//! Per-instance backup encryption as the service offers it: the engine's key
//! domains (strata-engine's `encryption`) plus restarting the instance's WAL
//! receiver, so WAL archived after the switch is sealed under the new key.

use strata_engine::{BackupEncryption, EngineError};
use strata_repo::InstanceKeyRecord;

use crate::{Service, ServiceError};

impl Service {
    /// Encrypts `instance_id`'s backups from now on under a data key that KMS
    /// key `kms_key_id` wraps (see `Engine::enable_backup_encryption`).
    pub async fn enable_backup_encryption(
        &self,
        instance_id: &str,
        kms_key_id: &str,
    ) -> Result<InstanceKeyRecord, ServiceError> {
        let before = self
            .engine
            .repo()
            .read_key_record(instance_id)
            .map_err(EngineError::from)?;
        let record = self
            .engine
            .enable_backup_encryption(instance_id, kms_key_id)
            .await?;
        if before.is_none() && self.wal.runs(instance_id) {
            // The running receiver holds the repository's keys: start it
            // again in the instance's key domain.
            self.wal.stop(instance_id).await;
            self.ensure_receiver(instance_id);
        }
        Ok(record)
    }

    /// Re-wraps `instance_id`'s data key (see `Engine::rotate_backup_encryption`).
    pub async fn rotate_backup_encryption(
        &self,
        instance_id: &str,
        to_key_id: Option<&str>,
    ) -> Result<InstanceKeyRecord, ServiceError> {
        Ok(self
            .engine
            .rotate_backup_encryption(instance_id, to_key_id)
            .await?)
    }

    /// `instance_id`'s key record and its KMS key's state, if encrypted.
    pub async fn backup_encryption(
        &self,
        instance_id: &str,
    ) -> Result<Option<BackupEncryption>, ServiceError> {
        Ok(self.engine.backup_encryption(instance_id).await?)
    }
}
