//! Imports over the API (`StrataImportBackupFile`): the output of
//! `pg_basebackup -Ft` placed by an operator in the configured import
//! directory, named by the request with one plain name beneath it, never a
//! path. The engine checks the directory whole before answering (a refusal
//! records nothing), then stores it in the background as a backup job.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use strata_catalog::Job;
use strata_engine::NoProgress;

use crate::policy::{invalid, Refusal};
use crate::{Service, ServiceResult};

/// Longest name accepted (a file name's limit on Linux).
const MAX_NAME: usize = 255;

/// `name` as one directory beneath `root`: letters, digits, `.`, `_`, `-`,
/// not starting with a dot (so neither `.` nor `..`), and a real directory
/// there, not a link to one.
pub(crate) fn import_path(root: &Path, name: &str) -> ServiceResult<PathBuf> {
    let well_formed = !name.is_empty()
        && name.len() <= MAX_NAME
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if !well_formed {
        return Err(invalid(
            Refusal::ImportFileMalformed,
            format!(
                "BackupFile {:?} is not a name in the import directory: letters, digits, '.', '_' and '-' only, not starting with '.'",
                name.chars().take(64).collect::<String>()
            ),
        ));
    }
    let dir = root.join(name);
    match std::fs::symlink_metadata(&dir) {
        Ok(meta) if meta.is_dir() => Ok(dir),
        Ok(_) => Err(invalid(
            Refusal::ImportFileMalformed,
            format!("BackupFile {name} is not a directory in the import directory"),
        )),
        Err(_) => Err(invalid(
            Refusal::ImportFileNotFound,
            format!("there is no directory {name} in the import directory"),
        )),
    }
}

impl Service {
    /// The directory `name` of the configured import directory, checked
    /// by [`import_path`]; refused when imports over the API are off.
    pub(crate) fn import_dir_of(&self, name: &str) -> ServiceResult<PathBuf> {
        let Some(root) = self.settings.import_dir.as_deref() else {
            return Err(invalid(
                Refusal::ImportDisabled,
                "imports over the API are off: set import.dir in the configuration to the directory operators place backups in",
            ));
        };
        import_path(root, name)
    }

    /// Imports the `pg_basebackup -Ft` output directory `name` of the
    /// import directory as a backup set of `instance_id`: checked now
    /// (refused with nothing recorded), stored in the background; returns
    /// the job, which names the set.
    pub async fn import_backup_file(
        self: &Arc<Self>,
        instance_id: &str,
        name: &str,
    ) -> ServiceResult<Job> {
        let dir = self.import_dir_of(name)?;
        let pending = self
            .engine
            .prepare_import(instance_id, &dir, &NoProgress)
            .await?;
        Ok(self.spawn_import(pending))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_names_of_real_directories_are_taken() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("nightly-2026.12.01")).unwrap();
        std::fs::write(root.path().join("file"), b"x").unwrap();
        std::os::unix::fs::symlink("/etc", root.path().join("link")).unwrap();
        assert_eq!(
            import_path(root.path(), "nightly-2026.12.01").unwrap(),
            root.path().join("nightly-2026.12.01")
        );
        for (name, why) in [
            ("../etc", "not a name"),
            ("..", "not a name"),
            (".hidden", "not a name"),
            ("/etc", "not a name"),
            ("a/b", "not a name"),
            ("", "not a name"),
            ("file", "not a directory"),
            ("link", "not a directory"),
            ("absent", "there is no directory"),
        ] {
            let err = import_path(root.path(), name).unwrap_err().to_string();
            assert!(err.contains(why), "{name}: {err}");
        }
    }
}
