//! AccessKey pairs for the API: generation, the admin key a first start
//! creates, and the `strata key` commands. Secrets are written only to the
//! catalog and to files readable by their owner alone.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use chrono::Utc;
use rand::distributions::Alphanumeric;
use rand::Rng;
use strata_catalog::{AccessKey, Catalog};

fn random_alnum(n: usize) -> String {
    rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(n)
        .map(char::from)
        .collect()
}

/// A new key pair: ids look like RDS's (`STRATA` + 18 characters),
/// secrets are 30 random characters (about 178 bits).
pub fn generate(read_only: bool, description: &str) -> AccessKey {
    AccessKey {
        id: format!("STRATA{}", random_alnum(18).to_ascii_uppercase()),
        secret: random_alnum(30),
        read_only,
        description: description.to_string(),
        created_at: Utc::now(),
    }
}

/// `{"AccessKeyId": "...", "AccessKeySecret": "..."}`.
pub fn pair_json(key: &AccessKey) -> String {
    serde_json::json!({"AccessKeyId": key.id, "AccessKeySecret": key.secret}).to_string()
}

/// Writes a file only its owner can read (0600), replacing it atomically.
pub fn write_private(path: &Path, contents: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("cannot create {}", tmp.display()))?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// Restricts a file holding secrets (the catalog) to its owner.
pub fn make_private(path: &Path) -> Result<()> {
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.permissions().mode() & 0o077 != 0 {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                .with_context(|| format!("cannot restrict permissions of {}", path.display()))?;
        }
    }
    Ok(())
}

/// Where the admin key a first start creates is kept.
pub fn admin_key_path(data_dir: &Path) -> PathBuf {
    data_dir.join("admin-key.json")
}

/// Creates the admin key when the catalog has no key at all; returns it and
/// the file it was written to.
pub fn ensure_admin_key(
    catalog: &dyn Catalog,
    data_dir: &Path,
) -> Result<Option<(AccessKey, PathBuf)>> {
    if !catalog.list_access_keys()?.is_empty() {
        return Ok(None);
    }
    let key = generate(false, "admin (created on first start)");
    let path = admin_key_path(data_dir);
    write_private(&path, &format!("{}\n", pair_json(&key)))?;
    catalog.add_access_key(&key)?;
    Ok(Some((key, path)))
}
