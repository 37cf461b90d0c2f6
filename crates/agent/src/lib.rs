//! Strata's agent on the database host: copy-on-write snapshots of a PostgreSQL data
//! directory and clones of them, served over signed HTTP to the Strata server.
//!
//! - [`cow`]: reflink one file, probe a file system, changed ranges between two clones.
//! - [`snapshot`]: snapshot a data directory (as `pg_basebackup` would see it), label,
//!   list, delete, clone.
//! - [`clone_server`]: start, stop and report a PostgreSQL server in a clone, its
//!   configuration neutralized by `pg_conf` as the Strata server's restored copies are.
//! - [`wal`]: WAL files put into snapshots and clones, segment ranges reflinked from `pg_wal`.
//! - [`fingerprint`]: a snapshot's fingerprint, checked before it is used.
//! - [`auth`]: the agent's key file and the request signature.
//! - [`proto`]: the HTTP API's paths and bodies.
//! - [`server`]: the agent (`strata agent`).
//! - [`client`]: [`AgentClient`], what the Strata server calls.
//!
//! The protocol, its authentication and failure modes are described in docs/AGENT.md.
#![warn(missing_docs)]

pub mod auth;
pub mod client;
pub mod clone_server;
pub mod cow;
pub mod fingerprint;
pub mod names;
pub mod proto;
pub mod server;
pub mod snapshot;
pub mod wal;

pub use auth::{AgentKey, KeyError};
pub use client::{AgentClient, AgentError, RangeReader, Timeouts};
pub use clone_server::{CloneStarted, CloneStatus, StartRequest, TargetRequest};
pub use fingerprint::{Fingerprint, FingerprintError};
pub use names::{CloneName, InvalidName, RelPath, SnapshotName};
pub use server::{Agent, StartError, TlsFiles};
pub use snapshot::{FreeFloor, Labels, Layout};
pub use wal::{WalAdded, WalFileName};
