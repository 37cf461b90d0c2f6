//! The catalog's schema history: one ordered list of versioned steps that
//! every backend follows. A catalog records the version it reached (SQLite:
//! `PRAGMA user_version`; PostgreSQL: one row per step in
//! `strata_schema_migrations`) and applies the steps after it, so any catalog
//! written by an earlier release opens and upgrades. Never edit a released
//! step: append a new one, with its SQL for every backend.
//!
//! Both backends hold the same tables, columns and keys with the same
//! meaning; only the types differ where SQLite has none of its own:
//! PostgreSQL keeps times as `timestamptz` (SQLite: RFC 3339 text in UTC),
//! truth values as `boolean` (SQLite: 0/1), every integer as `bigint`
//! (LSNs, which are unsigned 64-bit, bit-for-bit as signed), and ids the
//! catalog assigns as identity columns (SQLite: `AUTOINCREMENT`).

/// One step of the schema history.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    /// The schema version a catalog has once this step ran: steps are
    /// numbered 1, 2, 3… in list order.
    pub version: i64,
    /// What the step adds, for people and logs.
    pub description: &'static str,
    /// The step's SQL for the SQLite catalog.
    pub sqlite: &'static str,
    /// The same step for the PostgreSQL catalog.
    pub postgres: &'static str,
}

/// Every step, oldest first; the newest version is the last step's.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        description: "instances, backup sets, WAL segments, restore points and jobs",
        sqlite: r#"
CREATE TABLE instances (
    id TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    port INTEGER NOT NULL,
    user_name TEXT NOT NULL,
    password_env TEXT,
    dbname TEXT,
    sslmode TEXT NOT NULL,
    sslrootcert TEXT,
    system_identifier TEXT,
    pg_version_num INTEGER,
    wal_segment_size INTEGER,
    created_at TEXT NOT NULL
);
CREATE TABLE backup_sets (
    id TEXT PRIMARY KEY,
    instance_id TEXT NOT NULL,
    status TEXT NOT NULL,
    mode TEXT NOT NULL,
    started_at TEXT NOT NULL,
    finished_at TEXT,
    start_lsn INTEGER,
    stop_lsn INTEGER,
    start_timeline INTEGER,
    stop_timeline INTEGER,
    pg_version_num INTEGER,
    total_bytes INTEGER NOT NULL DEFAULT 0,
    new_bytes INTEGER NOT NULL DEFAULT 0,
    dedup_bytes INTEGER NOT NULL DEFAULT 0,
    stored_bytes INTEGER NOT NULL DEFAULT 0,
    file_count INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    job_id INTEGER
);
CREATE INDEX backup_sets_instance ON backup_sets(instance_id, started_at);
CREATE TABLE wal_segments (
    instance_id TEXT NOT NULL,
    timeline INTEGER NOT NULL,
    segment TEXT NOT NULL,
    partial INTEGER NOT NULL,
    begin_lsn INTEGER NOT NULL,
    end_lsn INTEGER NOT NULL,
    size INTEGER NOT NULL,
    checksum TEXT NOT NULL,
    first_commit TEXT,
    last_commit TEXT,
    commit_count INTEGER NOT NULL,
    min_commit_xid INTEGER,
    max_commit_xid INTEGER,
    object_key TEXT NOT NULL,
    stored_at TEXT NOT NULL,
    PRIMARY KEY (instance_id, timeline, segment, partial)
);
CREATE TABLE restore_points (
    instance_id TEXT NOT NULL,
    timeline INTEGER NOT NULL,
    name TEXT NOT NULL,
    lsn INTEGER NOT NULL,
    time TEXT NOT NULL,
    PRIMARY KEY (instance_id, lsn)
);
CREATE TABLE jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    instance_id TEXT,
    state TEXT NOT NULL,
    progress INTEGER NOT NULL DEFAULT 0,
    detail TEXT NOT NULL DEFAULT '',
    backup_id TEXT,
    started_at TEXT NOT NULL,
    finished_at TEXT,
    error TEXT,
    pid INTEGER NOT NULL
);
"#,
        postgres: r#"
CREATE TABLE instances (
    id text PRIMARY KEY,
    host text NOT NULL,
    port bigint NOT NULL,
    user_name text NOT NULL,
    password_env text,
    dbname text,
    sslmode text NOT NULL,
    sslrootcert text,
    system_identifier text,
    pg_version_num bigint,
    wal_segment_size bigint,
    created_at timestamptz NOT NULL
);
CREATE TABLE backup_sets (
    id text PRIMARY KEY,
    instance_id text NOT NULL,
    status text NOT NULL,
    mode text NOT NULL,
    started_at timestamptz NOT NULL,
    finished_at timestamptz,
    start_lsn bigint,
    stop_lsn bigint,
    start_timeline bigint,
    stop_timeline bigint,
    pg_version_num bigint,
    total_bytes bigint NOT NULL DEFAULT 0,
    new_bytes bigint NOT NULL DEFAULT 0,
    dedup_bytes bigint NOT NULL DEFAULT 0,
    stored_bytes bigint NOT NULL DEFAULT 0,
    file_count bigint NOT NULL DEFAULT 0,
    error text,
    job_id bigint
);
CREATE INDEX backup_sets_instance ON backup_sets(instance_id, started_at);
CREATE TABLE wal_segments (
    instance_id text NOT NULL,
    timeline bigint NOT NULL,
    segment text NOT NULL,
    partial boolean NOT NULL,
    begin_lsn bigint NOT NULL,
    end_lsn bigint NOT NULL,
    size bigint NOT NULL,
    checksum text NOT NULL,
    first_commit timestamptz,
    last_commit timestamptz,
    commit_count bigint NOT NULL,
    min_commit_xid bigint,
    max_commit_xid bigint,
    object_key text NOT NULL,
    stored_at timestamptz NOT NULL,
    PRIMARY KEY (instance_id, timeline, segment, partial)
);
CREATE TABLE restore_points (
    instance_id text NOT NULL,
    timeline bigint NOT NULL,
    name text NOT NULL,
    lsn bigint NOT NULL,
    time timestamptz NOT NULL,
    PRIMARY KEY (instance_id, lsn)
);
CREATE TABLE jobs (
    id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    kind text NOT NULL,
    instance_id text,
    state text NOT NULL,
    progress bigint NOT NULL DEFAULT 0,
    detail text NOT NULL DEFAULT '',
    backup_id text,
    started_at timestamptz NOT NULL,
    finished_at timestamptz,
    error text,
    pid bigint NOT NULL
);
"#,
    },
    Migration {
        version: 2,
        description: "instance passwords, backup policies, access keys and jobs by instance",
        sqlite: r#"
ALTER TABLE instances ADD COLUMN password TEXT;
CREATE TABLE backup_policies (
    instance_id TEXT PRIMARY KEY,
    backup_days TEXT NOT NULL,
    backup_window TEXT NOT NULL,
    backup_retention_days INTEGER NOT NULL,
    log_backup_enabled INTEGER NOT NULL,
    log_retention_days INTEGER NOT NULL,
    updated_at TEXT NOT NULL,
    last_auto_slot TEXT
);
CREATE TABLE access_keys (
    id TEXT PRIMARY KEY,
    secret TEXT NOT NULL,
    read_only INTEGER NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    created_at TEXT NOT NULL
);
CREATE INDEX jobs_instance ON jobs(instance_id, id);
"#,
        postgres: r#"
ALTER TABLE instances ADD COLUMN password text;
CREATE TABLE backup_policies (
    instance_id text PRIMARY KEY,
    backup_days text NOT NULL,
    backup_window text NOT NULL,
    backup_retention_days bigint NOT NULL,
    log_backup_enabled boolean NOT NULL,
    log_retention_days bigint NOT NULL,
    updated_at timestamptz NOT NULL,
    last_auto_slot timestamptz
);
CREATE TABLE access_keys (
    id text PRIMARY KEY,
    secret text NOT NULL,
    read_only boolean NOT NULL,
    description text NOT NULL DEFAULT '',
    created_at timestamptz NOT NULL
);
CREATE INDEX jobs_instance ON jobs(instance_id, id);
"#,
    },
    Migration {
        version: 3,
        description: "request nonces, so a signed request cannot be replayed",
        sqlite: r#"
CREATE TABLE used_nonces (
    key_id TEXT NOT NULL,
    nonce TEXT NOT NULL,
    used_at TEXT NOT NULL,
    PRIMARY KEY (key_id, nonce)
);
CREATE INDEX used_nonces_age ON used_nonces(used_at);
"#,
        postgres: r#"
CREATE TABLE used_nonces (
    key_id text NOT NULL,
    nonce text NOT NULL,
    used_at timestamptz NOT NULL,
    PRIMARY KEY (key_id, nonce)
);
CREATE INDEX used_nonces_age ON used_nonces(used_at);
"#,
    },
    Migration {
        version: 4,
        description: "managed instances (clones Strata runs) and restore drills",
        sqlite: r#"
CREATE TABLE managed_instances (
    instance_id TEXT PRIMARY KEY,
    source_instance TEXT NOT NULL,
    backup_id TEXT,
    restore_time TEXT,
    data_dir TEXT NOT NULL,
    port INTEGER NOT NULL,
    pg_major INTEGER NOT NULL,
    status TEXT NOT NULL,
    error TEXT,
    created_at TEXT NOT NULL
);
CREATE TABLE backup_drills (
    backup_id TEXT PRIMARY KEY,
    instance_id TEXT NOT NULL,
    status TEXT NOT NULL,
    detail TEXT NOT NULL,
    started_at TEXT NOT NULL,
    finished_at TEXT,
    job_id INTEGER
);
"#,
        postgres: r#"
CREATE TABLE managed_instances (
    instance_id text PRIMARY KEY,
    source_instance text NOT NULL,
    backup_id text,
    restore_time timestamptz,
    data_dir text NOT NULL,
    port bigint NOT NULL,
    pg_major bigint NOT NULL,
    status text NOT NULL,
    error text,
    created_at timestamptz NOT NULL
);
CREATE TABLE backup_drills (
    backup_id text PRIMARY KEY,
    instance_id text NOT NULL,
    status text NOT NULL,
    detail text NOT NULL,
    started_at timestamptz NOT NULL,
    finished_at timestamptz,
    job_id bigint
);
"#,
    },
    Migration {
        version: 5,
        description: "cross-region policies and the copied backup sets and WAL segments",
        sqlite: r#"
CREATE TABLE cross_backup_policies (
    instance_id TEXT PRIMARY KEY,
    region TEXT NOT NULL,
    backup_enabled INTEGER NOT NULL,
    log_backup_enabled INTEGER NOT NULL,
    retention_days INTEGER NOT NULL,
    backup_enabled_at TEXT,
    log_backup_enabled_at TEXT,
    updated_at TEXT NOT NULL
);
-- The copied set and segment rows are kept whole as JSON: they are read
-- back as a whole and only ever looked up by instance.
CREATE TABLE cross_backups (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    region TEXT NOT NULL,
    instance_id TEXT NOT NULL,
    backup_id TEXT NOT NULL,
    backup_set TEXT NOT NULL,
    copied_bytes INTEGER NOT NULL,
    copied_at TEXT NOT NULL,
    UNIQUE (region, instance_id, backup_id)
);
CREATE TABLE cross_wal_segments (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    region TEXT NOT NULL,
    instance_id TEXT NOT NULL,
    timeline INTEGER NOT NULL,
    segment TEXT NOT NULL,
    wal_segment TEXT NOT NULL,
    copied_at TEXT NOT NULL,
    UNIQUE (region, instance_id, timeline, segment)
);
"#,
        postgres: r#"
CREATE TABLE cross_backup_policies (
    instance_id text PRIMARY KEY,
    region text NOT NULL,
    backup_enabled boolean NOT NULL,
    log_backup_enabled boolean NOT NULL,
    retention_days bigint NOT NULL,
    backup_enabled_at timestamptz,
    log_backup_enabled_at timestamptz,
    updated_at timestamptz NOT NULL
);
CREATE TABLE cross_backups (
    id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    region text NOT NULL,
    instance_id text NOT NULL,
    backup_id text NOT NULL,
    backup_set text NOT NULL,
    copied_bytes bigint NOT NULL,
    copied_at timestamptz NOT NULL,
    UNIQUE (region, instance_id, backup_id)
);
CREATE TABLE cross_wal_segments (
    id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    region text NOT NULL,
    instance_id text NOT NULL,
    timeline bigint NOT NULL,
    segment text NOT NULL,
    wal_segment text NOT NULL,
    copied_at timestamptz NOT NULL,
    UNIQUE (region, instance_id, timeline, segment)
);
"#,
    },
    Migration {
        version: 6,
        description: "storage usage samples",
        sqlite: r#"
CREATE TABLE usage_samples (
    instance_id TEXT NOT NULL,
    sampled_at TEXT NOT NULL,
    logical_bytes INTEGER NOT NULL,
    data_bytes INTEGER NOT NULL,
    wal_bytes INTEGER NOT NULL,
    quota_bytes INTEGER NOT NULL,
    cross_region_bytes INTEGER,
    PRIMARY KEY (instance_id, sampled_at)
);
"#,
        postgres: r#"
CREATE TABLE usage_samples (
    instance_id text NOT NULL,
    sampled_at timestamptz NOT NULL,
    logical_bytes bigint NOT NULL,
    data_bytes bigint NOT NULL,
    wal_bytes bigint NOT NULL,
    quota_bytes bigint NOT NULL,
    cross_region_bytes bigint,
    PRIMARY KEY (instance_id, sampled_at)
);
"#,
    },
    Migration {
        version: 7,
        description: "job leases (owner and heartbeat) and packs kept for the GC grace period",
        sqlite: r#"
-- A job belongs to a lease (owner id + heartbeat), never to a PID.
ALTER TABLE jobs ADD COLUMN owner TEXT;
ALTER TABLE jobs ADD COLUMN heartbeat_at TEXT;
CREATE INDEX jobs_open_owner ON jobs(owner) WHERE state NOT IN ('Finished', 'Failed');
-- Packs found unreferenced by a garbage collection, and since when: one is
-- deleted only once it stayed unreferenced for the grace period.
CREATE TABLE gc_pending (
    repository_id TEXT NOT NULL,
    pack_id TEXT NOT NULL,
    unreferenced_since TEXT NOT NULL,
    PRIMARY KEY (repository_id, pack_id)
);
"#,
        postgres: r#"
ALTER TABLE jobs ADD COLUMN owner text;
ALTER TABLE jobs ADD COLUMN heartbeat_at timestamptz;
CREATE INDEX jobs_open_owner ON jobs(owner) WHERE state NOT IN ('Finished', 'Failed');
CREATE TABLE gc_pending (
    repository_id text NOT NULL,
    pack_id text NOT NULL,
    unreferenced_since timestamptz NOT NULL,
    PRIMARY KEY (repository_id, pack_id)
);
"#,
    },
    Migration {
        version: 8,
        description: "fleet nodes and instance ownership leases",
        sqlite: r#"
-- The strata serve nodes sharing this catalog and their last heartbeat.
CREATE TABLE nodes (
    id TEXT PRIMARY KEY,
    api_address TEXT NOT NULL,
    started_at TEXT NOT NULL,
    heartbeat_at TEXT NOT NULL,
    version TEXT NOT NULL
);
-- Which node runs each instance's work, until when; the epoch counts
-- changes of hands.
CREATE TABLE instance_owners (
    instance_id TEXT PRIMARY KEY,
    node_id TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    expires_at TEXT NOT NULL
);
CREATE INDEX instance_owners_node ON instance_owners(node_id);
"#,
        postgres: r#"
CREATE TABLE nodes (
    id TEXT PRIMARY KEY,
    api_address TEXT NOT NULL,
    started_at TIMESTAMPTZ NOT NULL,
    heartbeat_at TIMESTAMPTZ NOT NULL,
    version TEXT NOT NULL
);
CREATE TABLE instance_owners (
    instance_id TEXT PRIMARY KEY,
    node_id TEXT NOT NULL,
    epoch BIGINT NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL
);
CREATE INDEX instance_owners_node ON instance_owners(node_id);
"#,
    },
    Migration {
        version: 9,
        description: "repository holds (garbage collection against backups and readers on any node) and shared secrets",
        sqlite: r#"
-- A hold on a repository's packs: shared by a backup or a reader, exclusive
-- by a garbage collection. A hold lives until released or until its holder
-- stops renewing it past expires_at; an expired hold is removed by the next
-- acquirer of the repository.
CREATE TABLE repo_holds (
    hold_id TEXT PRIMARY KEY,
    repository_id TEXT NOT NULL,
    exclusive INTEGER NOT NULL,
    owner TEXT NOT NULL,
    purpose TEXT NOT NULL,
    acquired_at TEXT NOT NULL,
    expires_at TEXT NOT NULL
);
CREATE INDEX repo_holds_repository ON repo_holds(repository_id);
-- Secrets every node must agree on (the download-link key), created once
-- by whichever node needs one first.
CREATE TABLE shared_secrets (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    created_at TEXT NOT NULL
);
"#,
        postgres: r#"
CREATE TABLE repo_holds (
    hold_id text PRIMARY KEY,
    repository_id text NOT NULL,
    exclusive boolean NOT NULL,
    owner text NOT NULL,
    purpose text NOT NULL,
    acquired_at timestamptz NOT NULL,
    expires_at timestamptz NOT NULL
);
CREATE INDEX repo_holds_repository ON repo_holds(repository_id);
CREATE TABLE shared_secrets (
    name text PRIMARY KEY,
    value text NOT NULL,
    created_at timestamptz NOT NULL
);
"#,
    },
    Migration {
        version: 10,
        description: "console sessions every node knows",
        sqlite: r#"
-- Console sessions by the SHA-256 of their id (the cookie's value is never
-- stored), so any node behind a load balancer serves a signed-in user.
CREATE TABLE console_sessions (
    id_hash TEXT PRIMARY KEY,
    key_id TEXT NOT NULL,
    read_only INTEGER NOT NULL,
    csrf TEXT NOT NULL,
    created_at TEXT NOT NULL,
    last_seen_at TEXT NOT NULL,
    flash TEXT
);
"#,
        postgres: r#"
CREATE TABLE console_sessions (
    id_hash text PRIMARY KEY,
    key_id text NOT NULL,
    read_only boolean NOT NULL,
    csrf text NOT NULL,
    created_at timestamptz NOT NULL,
    last_seen_at timestamptz NOT NULL,
    flash text
);
"#,
    },
    Migration {
        version: 11,
        description: "jobs queued for an instance's owner, and WAL receiver states every node can read",
        sqlite: r#"
-- A job started through any node's API waits, queued, until the node owning
-- its instance claims it (owner set, queued cleared); node_id names the node
-- that ran it.
ALTER TABLE jobs ADD COLUMN queued INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN node_id TEXT;
CREATE INDEX jobs_queued ON jobs(id) WHERE queued = 1;
-- Each instance's WAL receiver as its owner last published it.
CREATE TABLE wal_receivers (
    instance_id TEXT PRIMARY KEY,
    node_id TEXT NOT NULL,
    running INTEGER NOT NULL,
    received_lsn INTEGER NOT NULL,
    server_end_lsn INTEGER NOT NULL,
    last_message_at TEXT,
    last_error TEXT,
    failing TEXT,
    published_at TEXT NOT NULL
);
"#,
        postgres: r#"
ALTER TABLE jobs ADD COLUMN queued boolean NOT NULL DEFAULT false;
ALTER TABLE jobs ADD COLUMN node_id text;
CREATE INDEX jobs_queued ON jobs(id) WHERE queued;
CREATE TABLE wal_receivers (
    instance_id text PRIMARY KEY,
    node_id text NOT NULL,
    running boolean NOT NULL,
    received_lsn bigint NOT NULL,
    server_end_lsn bigint NOT NULL,
    last_message_at timestamptz,
    last_error text,
    failing text,
    published_at timestamptz NOT NULL
);
"#,
    },
    Migration {
        version: 12,
        description: "snapshot backups through an agent on the database host",
        sqlite: r#"
-- The agent serving an instance's data directory, and its credential as
-- stored (plain:<hex> or sealed:<hex>).
ALTER TABLE instances ADD COLUMN agent_url TEXT;
ALTER TABLE instances ADD COLUMN agent_key TEXT;
ALTER TABLE instances ADD COLUMN agent_ca TEXT;
-- How a set was copied; a snapshot set's local copy and upload state.
ALTER TABLE backup_sets ADD COLUMN method TEXT NOT NULL DEFAULT 'Physical';
ALTER TABLE backup_sets ADD COLUMN snapshot_local INTEGER NOT NULL DEFAULT 0;
ALTER TABLE backup_sets ADD COLUMN snapshot_uploaded INTEGER NOT NULL DEFAULT 0;
ALTER TABLE backup_sets ADD COLUMN snapshot_bytes INTEGER;
-- How automatic backups copy the data (Snapshot: RDS's Category Flash).
ALTER TABLE backup_policies ADD COLUMN backup_method TEXT NOT NULL DEFAULT 'Physical';
"#,
        postgres: r#"
ALTER TABLE instances ADD COLUMN agent_url text;
ALTER TABLE instances ADD COLUMN agent_key text;
ALTER TABLE instances ADD COLUMN agent_ca text;
ALTER TABLE backup_sets ADD COLUMN method text NOT NULL DEFAULT 'Physical';
ALTER TABLE backup_sets ADD COLUMN snapshot_local boolean NOT NULL DEFAULT false;
ALTER TABLE backup_sets ADD COLUMN snapshot_uploaded boolean NOT NULL DEFAULT false;
ALTER TABLE backup_sets ADD COLUMN snapshot_bytes bigint;
ALTER TABLE backup_policies ADD COLUMN backup_method text NOT NULL DEFAULT 'Physical';
"#,
    },
    Migration {
        version: 13,
        description: "clones of snapshots running on the database host",
        sqlite: r#"
-- The clone's name on the source instance's agent, for a clone of a local
-- snapshot started there (NULL: a server under Strata's instances directory).
ALTER TABLE managed_instances ADD COLUMN agent_clone TEXT;
"#,
        postgres: r#"
ALTER TABLE managed_instances ADD COLUMN agent_clone text;
"#,
    },
    Migration {
        version: 14,
        description: "richer retention: high-frequency snapshots, sparse rules, archives, keep",
        sqlite: r#"
-- BackupInterval in minutes (NULL: off); the advanced (sparse) policy with
-- its rules as JSON (a list of {id, kind, retention_days}); archived
-- backups; count-based retention (NULL: off).
ALTER TABLE backup_policies ADD COLUMN backup_interval_minutes INTEGER;
ALTER TABLE backup_policies ADD COLUMN advanced_enabled INTEGER NOT NULL DEFAULT 0;
ALTER TABLE backup_policies ADD COLUMN advanced_data_rules TEXT NOT NULL DEFAULT '[]';
ALTER TABLE backup_policies ADD COLUMN advanced_log_retention_days INTEGER;
ALTER TABLE backup_policies ADD COLUMN archive_retention_days INTEGER NOT NULL DEFAULT 0;
ALTER TABLE backup_policies ADD COLUMN archive_keep_policy TEXT NOT NULL DEFAULT 'ByMonth';
ALTER TABLE backup_policies ADD COLUMN archive_keep_count INTEGER NOT NULL DEFAULT 1;
ALTER TABLE backup_policies ADD COLUMN keep_last INTEGER;
-- A set kept by hand (keep_until NULL while kept: forever) and why; the
-- rule an automatic set was taken under and the retention it had then.
ALTER TABLE backup_sets ADD COLUMN kept INTEGER NOT NULL DEFAULT 0;
ALTER TABLE backup_sets ADD COLUMN keep_until TEXT;
ALTER TABLE backup_sets ADD COLUMN keep_note TEXT;
ALTER TABLE backup_sets ADD COLUMN taken_rule TEXT;
ALTER TABLE backup_sets ADD COLUMN taken_retention_days INTEGER;
"#,
        postgres: r#"
ALTER TABLE backup_policies ADD COLUMN backup_interval_minutes bigint;
ALTER TABLE backup_policies ADD COLUMN advanced_enabled boolean NOT NULL DEFAULT false;
ALTER TABLE backup_policies ADD COLUMN advanced_data_rules text NOT NULL DEFAULT '[]';
ALTER TABLE backup_policies ADD COLUMN advanced_log_retention_days bigint;
ALTER TABLE backup_policies ADD COLUMN archive_retention_days bigint NOT NULL DEFAULT 0;
ALTER TABLE backup_policies ADD COLUMN archive_keep_policy text NOT NULL DEFAULT 'ByMonth';
ALTER TABLE backup_policies ADD COLUMN archive_keep_count bigint NOT NULL DEFAULT 1;
ALTER TABLE backup_policies ADD COLUMN keep_last bigint;
ALTER TABLE backup_sets ADD COLUMN kept boolean NOT NULL DEFAULT false;
ALTER TABLE backup_sets ADD COLUMN keep_until timestamptz;
ALTER TABLE backup_sets ADD COLUMN keep_note text;
ALTER TABLE backup_sets ADD COLUMN taken_rule text;
ALTER TABLE backup_sets ADD COLUMN taken_retention_days bigint;
"#,
    },
    Migration {
        version: 15,
        description: "snapshot fingerprints, checked before a snapshot is used",
        sqlite: r#"
-- A snapshot set's fingerprint (v1:<latest ctime>:<sha256>) taken when the
-- snapshot was complete (NULL: taken before fingerprints).
ALTER TABLE backup_sets ADD COLUMN snapshot_fingerprint TEXT;
"#,
        postgres: r#"
ALTER TABLE backup_sets ADD COLUMN snapshot_fingerprint text;
"#,
    },
    Migration {
        version: 16,
        description: "recovery events decoded from WAL, and the names of relations and databases",
        sqlite: r#"
-- One row per destructive effect of a committed transaction (a dropped or
-- truncated table, a dropped database, many rows deleted or updated),
-- keyed by its commit record and its place among that commit's effects;
-- filled_files: the files the transaction created and filled, comma-separated;
-- before_lsn: for a dropped database, where it was still intact.
CREATE TABLE recovery_events (
    instance_id TEXT NOT NULL,
    timeline INTEGER NOT NULL,
    lsn INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    end_lsn INTEGER NOT NULL,
    kind TEXT NOT NULL,
    xid INTEGER NOT NULL,
    time TEXT NOT NULL,
    db_oid INTEGER NOT NULL,
    relfilenode INTEGER,
    rel_oid INTEGER,
    database_name TEXT,
    schema_name TEXT,
    table_name TEXT,
    row_count INTEGER,
    filled_files TEXT NOT NULL DEFAULT '',
    before_lsn INTEGER,
    PRIMARY KEY (instance_id, timeline, lsn, seq)
);
CREATE INDEX recovery_events_time ON recovery_events(instance_id, time);
-- The last name seen for each relation file and database of an instance,
-- read from the server: names for events whose WAL names only numbers.
CREATE TABLE relation_names (
    instance_id TEXT NOT NULL,
    db_oid INTEGER NOT NULL,
    relfilenode INTEGER NOT NULL,
    rel_oid INTEGER NOT NULL,
    schema_name TEXT NOT NULL,
    rel_name TEXT NOT NULL,
    rel_kind TEXT NOT NULL,
    seen_at TEXT NOT NULL,
    PRIMARY KEY (instance_id, db_oid, relfilenode)
);
CREATE TABLE database_names (
    instance_id TEXT NOT NULL,
    db_oid INTEGER NOT NULL,
    name TEXT NOT NULL,
    seen_at TEXT NOT NULL,
    PRIMARY KEY (instance_id, db_oid)
);
"#,
        postgres: r#"
CREATE TABLE recovery_events (
    instance_id text NOT NULL,
    timeline bigint NOT NULL,
    lsn bigint NOT NULL,
    seq bigint NOT NULL,
    end_lsn bigint NOT NULL,
    kind text NOT NULL,
    xid bigint NOT NULL,
    time timestamptz NOT NULL,
    db_oid bigint NOT NULL,
    relfilenode bigint,
    rel_oid bigint,
    database_name text,
    schema_name text,
    table_name text,
    row_count bigint,
    filled_files text NOT NULL DEFAULT '',
    before_lsn bigint,
    PRIMARY KEY (instance_id, timeline, lsn, seq)
);
CREATE INDEX recovery_events_time ON recovery_events(instance_id, time);
CREATE TABLE relation_names (
    instance_id text NOT NULL,
    db_oid bigint NOT NULL,
    relfilenode bigint NOT NULL,
    rel_oid bigint NOT NULL,
    schema_name text NOT NULL,
    rel_name text NOT NULL,
    rel_kind text NOT NULL,
    seen_at timestamptz NOT NULL,
    PRIMARY KEY (instance_id, db_oid, relfilenode)
);
CREATE TABLE database_names (
    instance_id text NOT NULL,
    db_oid bigint NOT NULL,
    name text NOT NULL,
    seen_at timestamptz NOT NULL,
    PRIMARY KEY (instance_id, db_oid)
);
"#,
    },
    Migration {
        version: 17,
        description: "since when a WAL receiver fails, and since when its server is unreachable",
        sqlite: r#"
ALTER TABLE wal_receivers ADD COLUMN failing_since TEXT;
ALTER TABLE wal_receivers ADD COLUMN unreachable_since TEXT;
"#,
        postgres: r#"
ALTER TABLE wal_receivers ADD COLUMN failing_since timestamptz;
ALTER TABLE wal_receivers ADD COLUMN unreachable_since timestamptz;
"#,
    },
    Migration {
        version: 18,
        description: "each job's lease as its owner keeps it; one running backup set per instance",
        sqlite: r#"
-- How long the owner's lease on the job lasts past each heartbeat, in
-- milliseconds, as the owner set it (NULL: stored before, judged by the
-- observer's own lease).
ALTER TABLE jobs ADD COLUMN lease_ms INTEGER;
-- Sets left running side by side for one instance: all but the newest fail,
-- with their jobs, which change hands so their owners cannot revive them.
UPDATE backup_sets
   SET status = 'Failed',
       finished_at = strftime('%Y-%m-%dT%H:%M:%f000000Z', 'now'),
       error = 'another backup of the instance was running at the same time; the catalog upgrade kept the newer one'
 WHERE status = 'Running'
   AND EXISTS (SELECT 1 FROM backup_sets n
                WHERE n.instance_id = backup_sets.instance_id AND n.status = 'Running'
                  AND (n.started_at > backup_sets.started_at
                       OR (n.started_at = backup_sets.started_at AND n.id > backup_sets.id)));
UPDATE jobs
   SET state = 'Failed',
       finished_at = strftime('%Y-%m-%dT%H:%M:%f000000Z', 'now'),
       error = 'another backup of the instance was running at the same time; the catalog upgrade kept the newer one',
       owner = 'catalog-upgrade'
 WHERE state NOT IN ('Finished', 'Failed')
   AND id IN (SELECT job_id FROM backup_sets
               WHERE status = 'Failed' AND job_id IS NOT NULL
                 AND error = 'another backup of the instance was running at the same time; the catalog upgrade kept the newer one');
CREATE UNIQUE INDEX backup_sets_one_running ON backup_sets(instance_id) WHERE status = 'Running';
"#,
        postgres: r#"
ALTER TABLE jobs ADD COLUMN lease_ms bigint;
-- No set starts running between the clean-up and the index.
LOCK TABLE backup_sets IN SHARE ROW EXCLUSIVE MODE;
UPDATE backup_sets
   SET status = 'Failed',
       finished_at = now(),
       error = 'another backup of the instance was running at the same time; the catalog upgrade kept the newer one'
 WHERE status = 'Running'
   AND EXISTS (SELECT 1 FROM backup_sets n
                WHERE n.instance_id = backup_sets.instance_id AND n.status = 'Running'
                  AND (n.started_at > backup_sets.started_at
                       OR (n.started_at = backup_sets.started_at AND n.id > backup_sets.id)));
UPDATE jobs
   SET state = 'Failed',
       finished_at = now(),
       error = 'another backup of the instance was running at the same time; the catalog upgrade kept the newer one',
       owner = 'catalog-upgrade'
 WHERE state NOT IN ('Finished', 'Failed')
   AND id IN (SELECT job_id FROM backup_sets
               WHERE status = 'Failed' AND job_id IS NOT NULL
                 AND error = 'another backup of the instance was running at the same time; the catalog upgrade kept the newer one');
CREATE UNIQUE INDEX backup_sets_one_running ON backup_sets(instance_id) WHERE status = 'Running';
"#,
    },
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_count_up_from_one_in_list_order() {
        let versions: Vec<i64> = MIGRATIONS.iter().map(|m| m.version).collect();
        let expected: Vec<i64> = (1..=versions.len() as i64).collect();
        assert_eq!(versions, expected);
        for m in MIGRATIONS {
            assert!(!m.sqlite.trim().is_empty());
            assert!(!m.postgres.trim().is_empty());
        }
    }
}
