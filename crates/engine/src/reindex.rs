//! `repo reindex`: rebuilds the catalog's index of backup sets, WAL segments
//! and restore points from the repository alone (the repository is the
//! source of truth; jobs are operational history and are kept, and so are
//! the keeps by hand and retention rules recorded on sets still stored), and
//! each instance's block index in the repository from its manifests.

use serde::Serialize;
use strata_catalog::CatalogError;

use crate::entities;
use crate::segment::record_segment;
use strata_repo::KeyDomain;

use crate::{Engine, EngineError, EngineResult};

/// What a reindex found in the repository and put in the catalog.
#[derive(Debug, Default, Serialize)]
pub struct ReindexReport {
    /// Instance records read.
    pub instances: u64,
    /// Instances the catalog did not know.
    pub instances_added: u64,
    /// Backup sets indexed.
    pub backups: u64,
    /// WAL segments indexed.
    pub wal_segments: u64,
    /// Blocks in the rebuilt block indexes of the instances.
    pub blocks: u64,
    /// Instances registered without the environment variable their record
    /// names for the password: an unencrypted repository's records are not
    /// authenticated, so the operator names it again once the address is
    /// checked (`strata instance modify ID --password-env VAR`).
    pub password_env_not_restored: Vec<UnrestoredPasswordEnv>,
}

/// See [`ReindexReport::password_env_not_restored`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UnrestoredPasswordEnv {
    /// The instance registered.
    pub instance: strata_catalog::InstanceId,
    /// The server's host, as the record says.
    pub host: String,
    /// The server's port, as the record says.
    pub port: u16,
    /// Who logs in, as the record says.
    pub user: String,
    /// How the connection is protected, as the record says.
    pub sslmode: String,
    /// The variable the record names.
    pub variable: String,
}

impl Engine {
    /// Rebuilds the catalog's index from the repository (`strata repo reindex`).
    /// Every encrypted instance's key domain is unlocked first (the KMS):
    /// while one cannot be, nothing is changed.
    pub fn reindex(&self) -> EngineResult<ReindexReport> {
        let repo = self.whole_repo_blocking("reindex")?;
        let mut report = ReindexReport::default();
        // What only the catalog knows of a set (a keep by hand, the rule it
        // was taken under) carries over to the rebuilt row.
        let mut known = std::collections::HashMap::new();
        for i in self.catalog.list_instances()? {
            for b in self.catalog.list_backups(&i.id)? {
                known.insert(b.id.clone(), (b.keep_until, b.keep_note, b.taken_under));
            }
        }
        self.catalog.clear_index()?;
        for rec in repo.list_instances()? {
            report.instances += 1;
            match self.catalog.get_instance(&rec.id) {
                Ok(_) => {}
                // A user backup's owner is never registered: its set is indexed alone.
                Err(CatalogError::InstanceNotFound(_))
                    if strata_catalog::Instance::owns_user_backup(&rec.id) => {}
                Err(CatalogError::InstanceNotFound(_)) => {
                    let authenticated = repo.is_encrypted();
                    self.catalog
                        .add_instance(&entities::instance_from_record(&rec, authenticated)?)?;
                    report.instances_added += 1;
                    if let (false, Some(variable)) = (authenticated, &rec.password_env) {
                        report
                            .password_env_not_restored
                            .push(UnrestoredPasswordEnv {
                                instance: rec.id.clone(),
                                host: rec.host.clone(),
                                port: rec.port,
                                user: rec.user.clone(),
                                sslmode: rec.sslmode.clone(),
                                variable: variable.clone(),
                            });
                    }
                }
                Err(e) => return Err(e.into()),
            }
            for backup_id in repo.list_backups(&rec.id)? {
                let m = repo.read_manifest(&rec.id, &backup_id)?;
                let mut set = entities::backup_set_from_manifest(&rec.id, &m)?;
                if let Some((keep_until, keep_note, taken_under)) = known.remove(&set.id) {
                    (set.keep_until, set.keep_note, set.taken_under) =
                        (keep_until, keep_note, taken_under);
                }
                let inserted = self.catalog.insert_backup(&set);
                match inserted {
                    Ok(()) => {}
                    // Sets of two instances that started in the same
                    // millisecond (before ids were made unique) share an id;
                    // the catalog can index only one of them.
                    Err(strata_catalog::CatalogError::BackupExists(id)) => {
                        tracing::warn!(instance = %rec.id, "backup set {id} has the id of another instance's set; not indexed");
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                }
                report.backups += 1;
            }
            // The block index is written in the instance's own domain.
            let own = match repo.read_key_record(&rec.id)? {
                Some(k) => repo.writing_in(k.key_domain),
                None => repo.writing_in(KeyDomain::REPOSITORY),
            }
            .ok_or_else(|| {
                EngineError::Failed(format!("instance {}: key domain not unlocked", rec.id))
            })?;
            report.blocks += own.rebuild_block_index(&rec.id)?.entries;
            for obj in repo.list_wal(&rec.id)? {
                let (meta, _) = repo.read_wal(&obj.key)?;
                record_segment(self, &rec.id, &meta, obj.key.clone())?;
                report.wal_segments += 1;
            }
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use strata_catalog::{Catalog, Instance, SqliteCatalog, SslMode};
    use strata_repo::{InstanceRecord, KeySource, LocalStorage, Repository, Storage};

    use super::*;

    fn engine_on(dir: &std::path::Path, key: Option<&KeySource>) -> Engine {
        let catalog: Arc<dyn Catalog> = Arc::new(SqliteCatalog::open_in_memory().unwrap());
        let storage: Arc<dyn Storage> = Arc::new(LocalStorage::new(dir).unwrap());
        let repo = Repository::open_or_init_with_key(storage, key).unwrap();
        Engine::new(catalog, repo, crate::EngineSettings::default())
    }

    /// Registers `db1` (its password in PGPASSWORD_DB1) and plants the
    /// record a writer of the repository could: another host, and the
    /// variable holding the catalog's password.
    fn register_and_forge(engine: &Engine) {
        engine
            .add_instance(&Instance {
                password_env: Some("PGPASSWORD_DB1".into()),
                ..Instance::new("db1", "db1.example", 5433, "strata", SslMode::Prefer)
            })
            .unwrap();
        engine
            .repo
            .put_instance(&InstanceRecord {
                id: "planted".into(),
                host: "collector.example".into(),
                port: 5432,
                user: "any".into(),
                dbname: None,
                sslmode: "disable".into(),
                password_env: Some("STRATA_CATALOG_PW".into()),
                created_at: chrono::Utc::now(),
            })
            .unwrap();
    }

    fn password_envs(engine: &Engine) -> Vec<(String, Option<String>)> {
        let mut v: Vec<_> = engine
            .catalog
            .list_instances()
            .unwrap()
            .into_iter()
            .map(|i| (i.id.to_string(), i.password_env))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn an_unencrypted_repository_names_no_password_variable_to_a_reindex() {
        let dir = tempfile::tempdir().unwrap();
        register_and_forge(&engine_on(dir.path(), None));

        let rebuilt = engine_on(dir.path(), None);
        let report = rebuilt.reindex().unwrap();
        assert_eq!((report.instances, report.instances_added), (2, 2));
        assert_eq!(
            password_envs(&rebuilt),
            [("db1".into(), None), ("planted".into(), None)]
        );
        let mut unrestored = report.password_env_not_restored.clone();
        unrestored.sort_by(|a, b| a.instance.cmp(&b.instance));
        assert_eq!(
            unrestored
                .iter()
                .map(|u| (u.instance.to_string(), &*u.host, u.port, &*u.variable))
                .collect::<Vec<_>>(),
            [
                ("db1".into(), "db1.example", 5433, "PGPASSWORD_DB1"),
                (
                    "planted".into(),
                    "collector.example",
                    5432,
                    "STRATA_CATALOG_PW"
                )
            ]
        );

        // The operator names it again: in the catalog and in the record.
        rebuilt
            .set_password_env("db1", Some("PGPASSWORD_DB1".into()))
            .unwrap();
        assert_eq!(
            rebuilt.catalog.get_instance("db1").unwrap().password_env,
            Some("PGPASSWORD_DB1".into())
        );
        assert_eq!(
            rebuilt
                .repo
                .read_instance("db1")
                .unwrap()
                .unwrap()
                .password_env,
            Some("PGPASSWORD_DB1".into())
        );
        for bad in [
            "",
            "1PW",
            "PW=x",
            "PW\0",
            "-PW",
            "PW\nX",
            "P'W",
            "P\"W",
            "../PW",
            &"P".repeat(256),
        ] {
            match rebuilt.set_password_env("db1", Some(bad.into())) {
                Err(EngineError::Refused(m)) => assert!(m.contains("environment variable"), "{m}"),
                other => panic!("{bad:?}: {other:?}"),
            }
        }
        assert!(matches!(
            rebuilt.set_password_env("nobody", None),
            Err(EngineError::Catalog(CatalogError::InstanceNotFound(_)))
        ));
        // What a deregistered instance's restore reads carries no variable either.
        assert_eq!(
            rebuilt
                .recorded_instance("planted")
                .unwrap()
                .unwrap()
                .password_env,
            None
        );
    }

    #[test]
    fn an_encrypted_repositorys_records_keep_their_password_variable() {
        let dir = tempfile::tempdir().unwrap();
        let keys = tempfile::tempdir().unwrap();
        std::fs::write(keys.path().join("key"), [7u8; 32]).unwrap();
        let key = KeySource::KeyFile(keys.path().join("key"));
        register_and_forge(&engine_on(dir.path(), Some(&key)));

        let rebuilt = engine_on(dir.path(), Some(&key));
        let report = rebuilt.reindex().unwrap();
        assert_eq!(report.instances_added, 2);
        assert!(report.password_env_not_restored.is_empty());
        assert_eq!(
            password_envs(&rebuilt),
            [
                ("db1".into(), Some("PGPASSWORD_DB1".into())),
                ("planted".into(), Some("STRATA_CATALOG_PW".into()))
            ]
        );
    }
}
