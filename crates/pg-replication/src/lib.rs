//! Strata's own client for PostgreSQL's physical replication protocol: no libpq and no
//! pg_basebackup at run time.
//!
//! Built on the `postgres-protocol` codec. It does the startup handshake (trust, cleartext
//! password, MD5, SCRAM-SHA-256 without channel binding), TLS by libpq's `sslmode` rules, and
//! the walsender commands Strata needs: IDENTIFY_SYSTEM, SHOW, TIMELINE_HISTORY,
//! CREATE/DROP/READ_REPLICATION_SLOT, BASE_BACKUP (both the PostgreSQL 15+ single-COPY form and
//! the older one-COPY-per-tablespace form, normalised to one event sequence) and
//! START_REPLICATION PHYSICAL with standby status updates.
//!
//! Reference: doc/src/sgml/protocol.sgml ("Streaming Replication Protocol"),
//! src/backend/replication/walsender.c, src/backend/backup/basebackup.c and basebackup_copy.c,
//! src/bin/pg_basebackup/pg_basebackup.c and receivelog.c.

#![warn(missing_docs)]

mod basebackup;
mod client;
mod conn;
mod error;
mod options;
mod stream;
mod tar;
mod tls;

pub use basebackup::{
    BaseBackup, BaseBackupEvent, BaseBackupOptions, TablespaceInfo, TarEntry, TarEntryKind,
};
pub use client::{ReplicationClient, SystemIdentity};
pub use error::ReplicationError;
pub use options::{ConnectOptions, InvalidSslMode, SslMode};
pub use stream::{ReplicationMessage, ReplicationStream};
pub use tar::TarReader;

/// Re-exported so callers need not depend on `pg-wal` for the types in this API.
pub use pg_wal::{Lsn, TimelineId};
