//! The agent's HTTP API: paths, request and response bodies, the error body.
//!
//! JSON over HTTP/1.1 (HTTPS when the agent has a certificate), every request signed (see
//! `auth`). Paths, all under `/v1`:
//!
//! | method | path | body / query | answer |
//! |---|---|---|---|
//! | GET | `/v1/facts` | | [`HostFacts`] |
//! | GET | `/v1/snapshots` | | `[SnapshotInfo]` |
//! | POST | `/v1/snapshots/{name}` | | [`SnapshotCreated`] |
//! | DELETE | `/v1/snapshots/{name}` | | 204 |
//! | PUT | `/v1/snapshots/{name}/labels` | [`Labels`] | 204 |
//! | GET | `/v1/snapshots/{name}/manifest` | | [`Manifest`] |
//! | GET | `/v1/snapshots/{name}/space` | | [`SpaceEstimate`] |
//! | GET | `/v1/snapshots/{name}/file` | `?path=&offset=&len=` | the bytes (streamed) |
//! | GET | `/v1/snapshots/{name}/changes` | `?since=` | `[FileChanges]` |
//! | POST | `/v1/snapshots/{name}/wal` | `WalRangeRequest` | `WalAdded` |
//! | PUT | `/v1/snapshots/{name}/wal/{file}` | the WAL file's bytes | 201 |
//! | POST | `/v1/clones/{name}` | [`CloneRequest`] | [`CloneCreated`] |
//! | GET | `/v1/clones/{name}` | | `CloneStatus` |
//! | POST | `/v1/clones/{name}/start` | `StartRequest` | `CloneStarted` |
//! | POST | `/v1/clones/{name}/stop` | | `CloneStatus` |
//! | PUT | `/v1/clones/{name}/wal/{file}` | the WAL file's bytes | 201 |
//! | DELETE | `/v1/clones/{name}` | (stops its server first) | 204 |
//!
//! Refusals carry an [`ErrorBody`] with a one-line message and the status of its [`ErrorCode`].

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use crate::clone_server::{CloneStarted, CloneStatus, StartRequest, TargetRequest};
pub use crate::cow::{ByteRange, ChangedRanges, FsInfo};
use crate::names::SnapshotName;
pub use crate::snapshot::{
    CloneCreated, EntryKind, FileChanges, FileStamp, FreeFloor, Labels, Manifest, ManifestEntry,
    SnapshotCreated, SnapshotInfo,
};
pub use crate::wal::{WalAdded, WalFileName, WalRangeRequest};

/// Largest request body the agent reads (label files are the largest), WAL uploads aside: those
/// may be as large as the cluster's WAL segments.
pub const MAX_REQUEST_BODY: usize = 2 * 1024 * 1024;
/// Largest range one file read returns.
pub const MAX_READ_LEN: u64 = 1 << 30;

/// What the agent serves and on what.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostFacts {
    /// The agent's version.
    pub agent_version: String,
    /// The data directory it serves.
    pub data_dir: PathBuf,
    /// Where its snapshots are.
    pub snapshot_dir: PathBuf,
    /// Where its clones go (none: clones refused).
    pub clone_dir: Option<PathBuf>,
    /// The data directory's file system (`reflink`: snapshots possible).
    pub fs: FsInfo,
    /// The free-space floor under which snapshots are refused.
    pub min_free: FreeFloor,
    /// PostgreSQL major version from `PG_VERSION`.
    pub pg_major: Option<u32>,
    /// The cluster's system identifier (first 8 bytes of `global/pg_control`), so the server
    /// can check the agent serves the instance it thinks.
    pub system_identifier: Option<u64>,
}

/// A snapshot's space estimate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpaceEstimate {
    /// Bytes no other file shares (what deleting the snapshot frees, roughly).
    pub exclusive_bytes: u64,
    /// Logical bytes of its files.
    pub logical_bytes: u64,
}

/// Body of `POST /v1/clones/{name}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloneRequest {
    /// The snapshot to clone.
    pub snapshot: SnapshotName,
}

/// Query of `GET /v1/snapshots/{name}/file`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileQuery {
    /// The file, relative to the snapshot.
    pub path: String,
    /// First byte.
    #[serde(default)]
    pub offset: u64,
    /// Bytes wanted (capped at the file's end and at [`MAX_READ_LEN`]).
    pub len: u64,
}

/// Query of `GET /v1/snapshots/{name}/changes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangesQuery {
    /// The earlier snapshot to compare with.
    pub since: String,
}

/// What kind of refusal an error is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// Unsigned, wrongly signed, stale or replayed (401).
    Unauthorized,
    /// A name or path parameter broke the rules (400).
    InvalidParameter,
    /// No such snapshot, clone or file (404).
    NotFound,
    /// It already exists (409).
    Exists,
    /// Free space under the floor (507).
    LowSpace,
    /// Not possible as asked (422).
    Refused,
    /// The agent failed (500).
    Internal,
}

impl ErrorCode {
    /// The HTTP status of this kind.
    pub fn status(self) -> u16 {
        match self {
            ErrorCode::Unauthorized => 401,
            ErrorCode::InvalidParameter => 400,
            ErrorCode::NotFound => 404,
            ErrorCode::Exists => 409,
            ErrorCode::LowSpace => 507,
            ErrorCode::Refused => 422,
            ErrorCode::Internal => 500,
        }
    }
}

/// The body of every refusal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Its kind.
    pub code: ErrorCode,
    /// One line saying why.
    pub message: String,
    /// On a 401: the earliest request time the agent accepts (Unix seconds, when it started),
    /// so a client whose clock is behind can sign again with that time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<i64>,
}

/// Percent-encodes a query value (everything but unreserved characters).
pub fn encode_query_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
