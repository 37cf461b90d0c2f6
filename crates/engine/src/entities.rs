//! The one place the repository's records and the catalog's rows are
//! converted. The repository (crates/repo) and the catalog (crates/catalog)
//! do not know each other, and each keeps its own types because each has its
//! own contract: the repository's records are its on-disk format
//! (docs/REPOSITORY.md), the catalog's rows are its schema, and neither may
//! change with the other. The engine, which uses both, converts here and
//! nowhere else, so a field added to one side has one place to go.

use strata_catalog::{
    BackupMode, BackupSet, BackupStatus, Instance, RestorePointRow, WalSegmentRow,
};
use strata_repo::{BackupManifest, BackupStats, InstanceRecord, RepoError, WalSegmentMeta};

use crate::EngineResult;

/// What the repository keeps of an instance: its address and how to log in,
/// never its password nor what was learned from the server.
pub(crate) fn instance_record(i: &Instance) -> InstanceRecord {
    InstanceRecord {
        id: i.id.clone(),
        host: i.host.clone(),
        port: i.port,
        user: i.user.clone(),
        dbname: i.dbname.clone(),
        sslmode: i.sslmode.to_string(),
        password_env: i.password_env.clone(),
        created_at: i.created_at,
    }
}

/// The instance a repository record describes, as a reindex registers it:
/// no password (the repository never has one), nothing learned yet. The
/// environment variable holding its password is taken only from an
/// `authenticated` record (an encrypted repository's): whoever can write to
/// an unencrypted repository could otherwise name any variable of Strata's
/// environment, and a host to send its value to.
pub(crate) fn instance_from_record(
    rec: &InstanceRecord,
    authenticated: bool,
) -> EngineResult<Instance> {
    Ok(Instance {
        id: rec.id.clone(),
        host: rec.host.clone(),
        port: rec.port,
        user: rec.user.clone(),
        password_env: rec.password_env.clone().filter(|_| authenticated),
        password: None,
        dbname: rec.dbname.clone(),
        sslmode: rec.sslmode.parse().map_err(|e| RepoError::Corrupt {
            object: strata_repo::instance_key(&rec.id),
            reason: format!("{e}"),
        })?,
        sslrootcert: None,
        system_identifier: None,
        pg_version_num: None,
        wal_segment_size: None,
        created_at: rec.created_at,
        agent_url: None,
        agent_key: None,
        agent_ca: None,
    })
}

/// Copies what a backup wrote (sizes and file count) into its set.
pub(crate) fn record_stats(set: &mut BackupSet, stats: &BackupStats) {
    set.total_bytes = stats.total_bytes;
    set.new_bytes = stats.new_bytes;
    set.dedup_bytes = stats.dedup_bytes;
    set.stored_bytes = stats.stored_bytes;
    set.file_count = stats.file_count;
}

/// The catalog row of a committed backup set of `instance_id`, from its
/// manifest (reindex): a committed manifest is a successful set.
pub(crate) fn backup_set_from_manifest(
    instance_id: &str,
    m: &BackupManifest,
) -> EngineResult<BackupSet> {
    // Manifests from before backup modes were recorded have none.
    let mode = if m.mode.is_empty() {
        BackupMode::Manual
    } else {
        m.mode.parse().map_err(|e| RepoError::Corrupt {
            object: strata_repo::manifest_key(instance_id, &m.backup_id),
            reason: format!("{e}"),
        })?
    };
    let mut set = BackupSet::started(m.backup_id.clone(), instance_id, mode, m.start_time, None);
    set.status = BackupStatus::Success;
    set.finished_at = Some(m.stop_time);
    set.start_lsn = Some(m.start_lsn);
    set.stop_lsn = Some(m.stop_lsn);
    set.start_timeline = Some(m.start_timeline);
    set.stop_timeline = Some(m.stop_timeline);
    set.pg_version_num = Some(m.pg_version_num);
    record_stats(&mut set, &m.stats);
    // A set uploaded from a snapshot says so in its label; whether the
    // snapshot is still on the database host is the agent's to say, not the
    // repository's.
    if crate::snapshot_upload::is_snapshot_label(&m.label) {
        set.method = strata_catalog::BackupMethod::Snapshot;
        set.snapshot_uploaded = true;
        set.snapshot_local = false;
    }
    Ok(set)
}

/// The catalog row of a stored WAL object of `instance_id` at `object_key`.
pub(crate) fn wal_segment_row(
    instance_id: &str,
    meta: &WalSegmentMeta,
    object_key: String,
) -> WalSegmentRow {
    WalSegmentRow {
        instance_id: instance_id.into(),
        timeline: meta.timeline,
        segment: meta.segment.clone(),
        partial: meta.partial,
        begin_lsn: meta.begin_lsn,
        end_lsn: meta.end_lsn,
        size: meta.end_lsn - meta.begin_lsn,
        checksum: meta.checksum.clone(),
        first_commit: meta.first_commit,
        last_commit: meta.last_commit,
        commit_count: meta.commit_count,
        min_commit_xid: meta.min_commit_xid,
        max_commit_xid: meta.max_commit_xid,
        object_key,
        stored_at: meta.stored_at,
    }
}

/// The catalog rows of the restore points a WAL object records.
pub(crate) fn restore_point_rows<'a>(
    instance_id: &'a str,
    meta: &'a WalSegmentMeta,
) -> impl Iterator<Item = RestorePointRow> + 'a {
    meta.restore_points.iter().map(move |rp| RestorePointRow {
        instance_id: instance_id.into(),
        timeline: meta.timeline,
        name: rp.name.clone(),
        lsn: rp.lsn,
        time: rp.time,
    })
}

#[cfg(test)]
mod tests {
    use chrono::{TimeZone, Utc};
    use pg_wal::{Lsn, TimelineId};
    use strata_catalog::SslMode;
    use strata_repo::RestorePointInfo;

    use super::*;
    use crate::EngineError;

    fn instance() -> Instance {
        Instance {
            password_env: Some("PGPASSWORD_DB1".into()),
            password: Some("s3cret".into()),
            dbname: Some("app".into()),
            sslrootcert: Some("/etc/ca.pem".into()),
            system_identifier: Some(7),
            pg_version_num: Some(170002),
            wal_segment_size: Some(16 << 20),
            ..Instance::new("db1", "db.example", 5433, "strata", SslMode::VerifyFull)
        }
    }

    #[test]
    fn an_instance_keeps_its_address_in_the_repository_never_its_password() {
        let i = instance();
        let rec = instance_record(&i);
        assert_eq!(rec.sslmode, "verify-full");
        let text = serde_json::to_string(&rec).unwrap();
        assert!(!text.contains("s3cret"), "{text}");
        let back = instance_from_record(&rec, true).unwrap();
        // Address and login come back; the password and what was learned
        // from the server are not in the repository.
        assert_eq!(
            back,
            Instance {
                password: None,
                sslrootcert: None,
                system_identifier: None,
                pg_version_num: None,
                wal_segment_size: None,
                ..i
            }
        );
        // Unauthenticated, the record names no variable to read.
        let forged = instance_from_record(&rec, false).unwrap();
        assert_eq!((forged.password_env, forged.host), (None, rec.host.clone()));
        let bad = InstanceRecord {
            sslmode: "sometimes".into(),
            ..rec
        };
        match instance_from_record(&bad, true) {
            Err(EngineError::Repo(RepoError::Corrupt { object, reason })) => {
                assert_eq!(object, strata_repo::instance_key("db1"));
                assert!(reason.contains("sometimes"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }

    fn manifest(mode: &str) -> BackupManifest {
        let t = Utc.with_ymd_and_hms(2026, 12, 6, 1, 0, 0).unwrap();
        BackupManifest {
            format_version: 1,
            backup_id: "20261206T010000Z".into(),
            instance_id: "db1".into(),
            system_identifier: 7,
            pg_version_num: 170002,
            wal_segment_size: 16 << 20,
            label: "strata".into(),
            mode: mode.into(),
            start_lsn: Lsn(0x100_0028),
            start_timeline: TimelineId(2),
            stop_lsn: Lsn(0x100_0100),
            stop_timeline: TimelineId(3),
            start_time: t,
            stop_time: t + chrono::Duration::minutes(2),
            tablespaces: vec![],
            files: vec![],
            server_manifest: None,
            incremental_from: None,
            received_bytes: None,
            stats: BackupStats {
                file_count: 11,
                total_bytes: 1000,
                new_bytes: 600,
                dedup_bytes: 400,
                stored_bytes: 300,
                new_blocks: 6,
                dedup_blocks: 4,
                packs: 1,
            },
            contents: None,
        }
    }

    #[test]
    fn a_committed_manifest_is_a_successful_set_with_its_sizes() {
        let m = manifest("Automated");
        let set = backup_set_from_manifest("db1", &m).unwrap();
        assert_eq!(
            set,
            BackupSet {
                id: m.backup_id.clone(),
                instance_id: "db1".into(),
                status: BackupStatus::Success,
                mode: BackupMode::Automated,
                started_at: m.start_time,
                finished_at: Some(m.stop_time),
                start_lsn: Some(m.start_lsn),
                stop_lsn: Some(m.stop_lsn),
                start_timeline: Some(TimelineId(2)),
                stop_timeline: Some(TimelineId(3)),
                pg_version_num: Some(170002),
                total_bytes: 1000,
                new_bytes: 600,
                dedup_bytes: 400,
                stored_bytes: 300,
                file_count: 11,
                error: None,
                job_id: None,
                method: strata_catalog::BackupMethod::Physical,
                snapshot_local: false,
                snapshot_uploaded: false,
                snapshot_bytes: None,
                keep_until: None,
                keep_note: None,
                taken_under: None,
                snapshot_fingerprint: None,
            }
        );
        // Manifests from before modes were recorded are manual backups.
        let old = backup_set_from_manifest("db1", &manifest("")).unwrap();
        assert_eq!(old.mode, BackupMode::Manual);
        assert!(matches!(
            backup_set_from_manifest("db1", &manifest("Weekly")),
            Err(EngineError::Repo(RepoError::Corrupt { .. }))
        ));
    }

    #[test]
    fn a_manifest_uploaded_from_a_snapshot_is_a_snapshot_set_in_the_repository() {
        let mut m = manifest("Automated");
        m.label = crate::snapshot_label(&strata_agent::SnapshotName::new("1796547563402").unwrap());
        let set = backup_set_from_manifest("db1", &m).unwrap();
        assert_eq!(set.method, strata_catalog::BackupMethod::Snapshot);
        assert!(set.snapshot_uploaded && !set.snapshot_local);
        m.label = "strata backup 1796547563402".into();
        let set = backup_set_from_manifest("db1", &m).unwrap();
        assert_eq!(set.method, strata_catalog::BackupMethod::Physical);
        assert!(!set.snapshot_uploaded);
    }

    #[test]
    fn a_wal_object_is_one_segment_row_and_its_restore_points() {
        let t = Utc.with_ymd_and_hms(2026, 12, 6, 1, 0, 0).unwrap();
        let meta = WalSegmentMeta {
            timeline: TimelineId(2),
            segment: "000000020000000000000001".into(),
            begin_lsn: Lsn(0x100_0000),
            end_lsn: Lsn(0x100_8000),
            partial: true,
            checksum: "ab".repeat(32),
            first_commit: Some(t),
            last_commit: Some(t + chrono::Duration::seconds(5)),
            commit_count: 3,
            min_commit_xid: Some(740),
            max_commit_xid: Some(742),
            restore_points: vec![RestorePointInfo {
                name: "before".into(),
                lsn: Lsn(0x100_4000),
                time: t,
            }],
            events: Vec::new(),
            events_omitted: 0,
            stored_at: t + chrono::Duration::seconds(9),
        };
        let row = wal_segment_row("db1", &meta, "wal/key".into());
        assert_eq!(
            row,
            WalSegmentRow {
                instance_id: "db1".into(),
                timeline: TimelineId(2),
                segment: meta.segment.clone(),
                partial: true,
                begin_lsn: meta.begin_lsn,
                end_lsn: meta.end_lsn,
                size: 0x8000,
                checksum: meta.checksum.clone(),
                first_commit: meta.first_commit,
                last_commit: meta.last_commit,
                commit_count: 3,
                min_commit_xid: Some(740),
                max_commit_xid: Some(742),
                object_key: "wal/key".into(),
                stored_at: meta.stored_at,
            }
        );
        let points: Vec<RestorePointRow> = restore_point_rows("db1", &meta).collect();
        assert_eq!(
            points,
            vec![RestorePointRow {
                instance_id: "db1".into(),
                timeline: TimelineId(2),
                name: "before".into(),
                lsn: Lsn(0x100_4000),
                time: t,
            }]
        );
    }
}
