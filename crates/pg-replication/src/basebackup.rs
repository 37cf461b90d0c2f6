//! BASE_BACKUP: the command, and the stream of archives, files and manifest it returns,
//! normalised into one event sequence for every server version.
//!
//! PostgreSQL 15+ (src/backend/backup/basebackup_copy.c) sends the start position, the
//! tablespace list, then a single COPY OUT whose CopyData messages start with a type byte:
//! 'n' new archive (name, tablespace path), 'd' data, 'p' progress (bytes done), 'm' manifest
//! follows. PostgreSQL 13/14 (src/backend/replication/basebackup.c) send one COPY OUT per
//! tablespace, in the order of the tablespace list, then one for the manifest. Both end with a
//! result set holding the end position. Reference for the client side:
//! src/bin/pg_basebackup/pg_basebackup.c (`ReceiveArchiveStreamChunk`, `ReceiveCopyData`).

use std::collections::VecDeque;

use bytes::{Buf, Bytes};
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;

use crate::client::{
    column_str, log_notice, parse_lsn, parse_num, quote_literal, required_str, ConnState,
};
use crate::conn::{data_row_columns, server_error};
use crate::tar::TarReader;
use crate::{Lsn, ReplicationClient, ReplicationError, TimelineId};

/// Largest `Manifest` event; bigger CopyData chunks are split.
const MAX_MANIFEST_CHUNK: usize = 1024 * 1024;

/// One row of the tablespace list the server sends before the data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TablespaceInfo {
    /// `None` for the main data directory.
    pub oid: Option<u32>,
    /// Tablespace directory on the server; `None` for the main data directory.
    pub location: Option<String>,
    /// Estimated size (only with `progress`; the server reports kB, converted here).
    pub size_bytes: Option<u64>,
}

/// Options of BASE_BACKUP. WAL is never included: Strata streams it separately.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseBackupOptions {
    /// Backup label (`LABEL`), recorded in `backup_label`.
    pub label: String,
    /// Request an immediate checkpoint instead of a spread one.
    pub fast_checkpoint: bool,
    /// Ask the server to estimate sizes first and report progress while sending.
    pub progress: bool,
    /// Ask for a backup manifest with CRC32C file checksums (PostgreSQL 13+).
    pub manifest: bool,
    /// Server-side throttle in kB/s (32..=1048576).
    pub max_rate_kb: Option<u32>,
    /// Put symlinked tablespaces into a `tablespace_map` file instead of symlinks.
    pub tablespace_map: bool,
    /// Send relation files as `INCREMENTAL.*` files holding only the blocks changed since
    /// the backup whose manifest was uploaded with
    /// [`ReplicationClient::upload_manifest`] (PostgreSQL 17+, `summarize_wal = on`).
    pub incremental: bool,
}

impl Default for BaseBackupOptions {
    fn default() -> Self {
        BaseBackupOptions {
            label: "strata".into(),
            fast_checkpoint: true,
            progress: true,
            manifest: true,
            max_rate_kb: None,
            tablespace_map: true,
            incremental: false,
        }
    }
}

/// What a tar member is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TarEntryKind {
    /// A regular file.
    File,
    /// A directory.
    Directory,
    /// A symbolic link.
    Symlink {
        /// Where the link points.
        target: String,
    },
}

/// A member of a tablespace archive. `path` is relative to the tablespace root, without a
/// trailing slash for directories.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TarEntry {
    /// Member path.
    pub path: String,
    /// File, directory or link.
    pub kind: TarEntryKind,
    /// Permission bits (`st_mode & 07777`).
    pub mode: u32,
    /// Content length; 0 for directories and symlinks.
    pub size: u64,
    /// Seconds since the Unix epoch.
    pub mtime: i64,
}

/// What a running base backup yields, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BaseBackupEvent {
    /// A new archive: `base.tar` for the data directory or `<oid>.tar` for a tablespace.
    ArchiveStart {
        /// Archive name as the server sends it.
        name: String,
        /// OID of the tablespace; `None` for the data directory.
        tablespace_oid: Option<u32>,
        /// Tablespace location on the server.
        location: Option<String>,
    },
    /// A new member of the current archive; for files, `Data` events totalling exactly `size`
    /// bytes follow.
    Entry(TarEntry),
    /// Next chunk (at most 1 MiB) of the current file's contents.
    Data(Bytes),
    /// The current archive is complete.
    ArchiveEnd,
    /// Bytes sent so far by the server (compare with [`BaseBackup::total_size_bytes`]).
    Progress {
        /// Bytes sent so far.
        bytes_done: u64,
    },
    /// Next chunk of the `backup_manifest` JSON.
    Manifest(Bytes),
    /// The backup is complete; WAL up to `end_lsn` is needed to make it consistent.
    Finished {
        /// WAL position the restore must replay to.
        end_lsn: Lsn,
        /// Timeline of `end_lsn`.
        end_timeline: TimelineId,
    },
}

/// A running base backup; poll [`BaseBackup::next`] until it returns `None`. Dropping it early
/// leaves the connection unusable for further commands.
pub struct BaseBackup<'a> {
    client: &'a mut ReplicationClient,
    /// PostgreSQL 14 or older: one COPY OUT per archive, no in-band progress.
    legacy: bool,
    manifest_requested: bool,
    start_lsn: Lsn,
    start_timeline: TimelineId,
    tablespaces: Vec<TablespaceInfo>,
    pending: VecDeque<BaseBackupEvent>,
    tar: Option<TarReader>,
    in_copy: bool,
    in_manifest: bool,
    /// Legacy protocol: COPY OUT streams started so far.
    copies_started: usize,
    /// Legacy protocol: archive bytes received, reported as progress at each archive end.
    bytes_received: u64,
    end: Option<(Lsn, TimelineId)>,
    error: Option<ReplicationError>,
    done: bool,
}

fn command(opts: &BaseBackupOptions, server_version_num: u32) -> Result<String, ReplicationError> {
    if opts.manifest && server_version_num < 130000 {
        return Err(ReplicationError::Unsupported(
            "backup manifests need PostgreSQL 13".into(),
        ));
    }
    if opts.incremental && server_version_num < 170000 {
        return Err(ReplicationError::Unsupported(
            "incremental backups need PostgreSQL 17".into(),
        ));
    }
    let label = quote_literal(&opts.label);
    if server_version_num >= 150000 {
        let mut parts = vec![format!("LABEL {label}")];
        if opts.progress {
            parts.push("PROGRESS".into());
        }
        parts.push(
            if opts.fast_checkpoint {
                "CHECKPOINT 'fast'"
            } else {
                "CHECKPOINT 'spread'"
            }
            .into(),
        );
        parts.push("WAL false".into());
        if opts.manifest {
            parts.push("MANIFEST 'yes'".into());
            parts.push("MANIFEST_CHECKSUMS 'CRC32C'".into());
        }
        if opts.tablespace_map {
            parts.push("TABLESPACE_MAP".into());
        }
        parts.push("WAIT false".into());
        if let Some(rate) = opts.max_rate_kb {
            parts.push(format!("MAX_RATE {rate}"));
        }
        if opts.incremental {
            parts.push("INCREMENTAL".into());
        }
        Ok(format!("BASE_BACKUP ( {} )", parts.join(", ")))
    } else {
        let mut sql = format!("BASE_BACKUP LABEL {label}");
        if opts.progress {
            sql.push_str(" PROGRESS");
        }
        if opts.fast_checkpoint {
            sql.push_str(" FAST");
        }
        if opts.tablespace_map {
            sql.push_str(" TABLESPACE_MAP");
        }
        sql.push_str(" NOWAIT");
        if let Some(rate) = opts.max_rate_kb {
            sql.push_str(&format!(" MAX_RATE {rate}"));
        }
        if opts.manifest {
            sql.push_str(" MANIFEST 'yes' MANIFEST_CHECKSUMS 'CRC32C'");
        }
        Ok(sql)
    }
}

fn archive_name(oid: Option<u32>) -> String {
    match oid {
        Some(oid) => format!("{oid}.tar"),
        None => "base.tar".into(),
    }
}

/// Splits a CopyData payload into a C string and the rest.
fn take_cstr(buf: &mut Bytes) -> Result<String, ReplicationError> {
    let end = buf
        .iter()
        .position(|&b| b == 0)
        .ok_or_else(|| ReplicationError::protocol("unterminated string in 'n' message"))?;
    let s = buf.split_to(end);
    buf.advance(1);
    String::from_utf8(s.to_vec())
        .map_err(|_| ReplicationError::protocol("non-UTF-8 archive name or path"))
}

/// Most tablespaces a BASE_BACKUP's header may list (a cluster has a handful).
const MAX_TABLESPACES: usize = 65_536;

impl ReplicationClient {
    /// Starts BASE_BACKUP and reads up to the first archive; see [`BaseBackup`].
    pub async fn base_backup(
        &mut self,
        opts: &BaseBackupOptions,
    ) -> Result<BaseBackup<'_>, ReplicationError> {
        self.ensure_ready()?;
        let sql = command(opts, self.server_version_num())?;
        frontend::query(&sql, self.conn.out())?;
        self.conn.flush().await?;
        self.state = ConnState::Busy;

        let mut result_sets = 0usize;
        let mut start: Option<(Lsn, TimelineId)> = None;
        let mut tablespaces = Vec::new();
        let mut error = None;
        loop {
            let msg = self.conn.read_regular("during BASE_BACKUP").await?;
            match msg {
                Message::RowDescription(_) => result_sets += 1,
                Message::DataRow(body) => {
                    let row = data_row_columns(&body)?;
                    match result_sets {
                        1 => {
                            start = Some((
                                parse_lsn(required_str(&row, 0, "BASE_BACKUP start")?, "start")?,
                                TimelineId(parse_num(
                                    required_str(&row, 1, "BASE_BACKUP start")?,
                                    "start timeline",
                                )?),
                            ))
                        }
                        2 if tablespaces.len() >= MAX_TABLESPACES => {
                            return Err(ReplicationError::protocol(format!(
                                "BASE_BACKUP lists more than {MAX_TABLESPACES} tablespaces"
                            )))
                        }
                        2 => tablespaces.push(TablespaceInfo {
                            oid: column_str(&row, 0, "tablespace")?
                                .map(|t| parse_num(t, "tablespace oid"))
                                .transpose()?,
                            location: column_str(&row, 1, "tablespace")?.map(str::to_string),
                            size_bytes: column_str(&row, 2, "tablespace")?
                                .map(|t| parse_num::<u64>(t, "tablespace size"))
                                .transpose()?
                                .map(|kb| kb.saturating_mul(1024)),
                        }),
                        _ => return Err(ReplicationError::protocol("unexpected BASE_BACKUP row")),
                    }
                }
                Message::CommandComplete(_) => {}
                Message::NoticeResponse(body) => log_notice(&body),
                Message::ParameterStatus(body) => self.on_parameter_status(&body)?,
                Message::ErrorResponse(body) => error = Some(server_error(&body)),
                Message::ReadyForQuery(_) => {
                    self.state = ConnState::Ready;
                    return Err(error.unwrap_or_else(|| {
                        ReplicationError::protocol("BASE_BACKUP ended before sending data")
                    }));
                }
                Message::CopyOutResponse(_) => break,
                _ => return Err(ReplicationError::protocol("unexpected BASE_BACKUP message")),
            }
        }
        let (start_lsn, start_timeline) = start
            .ok_or_else(|| ReplicationError::protocol("BASE_BACKUP sent no start position"))?;
        let legacy = self.server_version_num() < 150000;
        let mut backup = BaseBackup {
            client: self,
            legacy,
            manifest_requested: opts.manifest,
            start_lsn,
            start_timeline,
            tablespaces,
            pending: VecDeque::new(),
            tar: None,
            in_copy: true,
            in_manifest: false,
            copies_started: 0,
            bytes_received: 0,
            end: None,
            error: None,
            done: false,
        };
        if legacy {
            backup.start_legacy_copy()?;
        }
        Ok(backup)
    }
}

impl BaseBackup<'_> {
    /// WAL location where the backup started (REDO point of its checkpoint).
    pub fn start_lsn(&self) -> Lsn {
        self.start_lsn
    }

    /// Timeline the backup started on.
    pub fn start_timeline(&self) -> TimelineId {
        self.start_timeline
    }

    /// Tablespaces in the order their archives will arrive (the main directory is last).
    pub fn tablespaces(&self) -> &[TablespaceInfo] {
        &self.tablespaces
    }

    /// Estimated total size, when `progress` was requested.
    pub fn total_size_bytes(&self) -> Option<u64> {
        self.tablespaces
            .iter()
            .map(|t| t.size_bytes)
            .sum::<Option<u64>>()
    }

    /// The next event; `None` once `Finished` has been returned and the server is ready again.
    pub async fn next(&mut self) -> Result<Option<BaseBackupEvent>, ReplicationError> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Ok(Some(event));
            }
            if self.done {
                return Ok(None);
            }
            let msg = self.client.conn.read_regular("during BASE_BACKUP").await?;
            self.handle(msg)?;
        }
    }

    fn handle(&mut self, msg: Message) -> Result<(), ReplicationError> {
        match msg {
            Message::CopyData(body) if self.in_copy => {
                let data = body.into_bytes();
                if self.legacy {
                    self.on_content(data)
                } else {
                    self.on_typed_copy_data(data)
                }
            }
            Message::CopyDone if self.in_copy => {
                self.in_copy = false;
                self.in_manifest = false;
                self.end_archive()
            }
            Message::CopyOutResponse(_) if self.legacy && !self.in_copy => {
                self.in_copy = true;
                self.start_legacy_copy()
            }
            Message::RowDescription(_) | Message::CommandComplete(_) if !self.in_copy => Ok(()),
            Message::DataRow(body) if !self.in_copy => {
                let row = data_row_columns(&body)?;
                self.end = Some((
                    parse_lsn(required_str(&row, 0, "BASE_BACKUP end")?, "end")?,
                    TimelineId(parse_num(
                        required_str(&row, 1, "BASE_BACKUP end")?,
                        "end timeline",
                    )?),
                ));
                Ok(())
            }
            Message::NoticeResponse(body) => {
                log_notice(&body);
                Ok(())
            }
            Message::ParameterStatus(body) => self.client.on_parameter_status(&body),
            Message::ErrorResponse(body) => {
                // The server follows an error with ReadyForQuery; keep reading to reach it.
                self.error = Some(server_error(&body));
                self.in_copy = false;
                self.tar = None;
                Ok(())
            }
            Message::ReadyForQuery(_) => {
                self.client.state = ConnState::Ready;
                self.done = true;
                if let Some(e) = self.error.take() {
                    return Err(e);
                }
                let (end_lsn, end_timeline) = self.end.ok_or_else(|| {
                    ReplicationError::protocol("BASE_BACKUP finished without an end position")
                })?;
                self.pending.push_back(BaseBackupEvent::Finished {
                    end_lsn,
                    end_timeline,
                });
                Ok(())
            }
            _ => Err(ReplicationError::protocol(format!(
                "unexpected message during BASE_BACKUP (in copy: {})",
                self.in_copy
            ))),
        }
    }

    /// PostgreSQL 15+ CopyData: a type byte, then the payload.
    fn on_typed_copy_data(&mut self, mut data: Bytes) -> Result<(), ReplicationError> {
        if data.is_empty() {
            return Err(ReplicationError::protocol("empty CopyData in BASE_BACKUP"));
        }
        let kind = data[0];
        data.advance(1);
        match kind {
            b'n' => {
                self.end_archive()?;
                let name = take_cstr(&mut data)?;
                let location = take_cstr(&mut data)?;
                let tablespace_oid = name
                    .strip_suffix(".tar")
                    .and_then(|stem| stem.parse::<u32>().ok());
                self.pending.push_back(BaseBackupEvent::ArchiveStart {
                    name,
                    tablespace_oid,
                    location: (!location.is_empty()).then_some(location),
                });
                self.tar = Some(TarReader::new());
                Ok(())
            }
            b'd' => self.on_content(data),
            b'p' => {
                if data.len() != 8 {
                    return Err(ReplicationError::protocol("bad progress message"));
                }
                let bytes_done = data.get_u64();
                self.pending
                    .push_back(BaseBackupEvent::Progress { bytes_done });
                Ok(())
            }
            b'm' => {
                self.end_archive()?;
                self.in_manifest = true;
                Ok(())
            }
            other => Err(ReplicationError::protocol(format!(
                "unknown BASE_BACKUP message type {:?}",
                char::from(other)
            ))),
        }
    }

    /// Archive or manifest bytes.
    fn on_content(&mut self, mut data: Bytes) -> Result<(), ReplicationError> {
        if self.in_manifest {
            while !data.is_empty() {
                let take = data.len().min(MAX_MANIFEST_CHUNK);
                self.pending
                    .push_back(BaseBackupEvent::Manifest(data.split_to(take)));
            }
            return Ok(());
        }
        let tar = self
            .tar
            .as_mut()
            .ok_or_else(|| ReplicationError::protocol("archive data before any archive"))?;
        self.bytes_received += data.len() as u64;
        tar.feed(data, &mut self.pending)
    }

    fn end_archive(&mut self) -> Result<(), ReplicationError> {
        if let Some(tar) = self.tar.take() {
            tar.finish()?;
            self.pending.push_back(BaseBackupEvent::ArchiveEnd);
            if self.legacy {
                self.pending.push_back(BaseBackupEvent::Progress {
                    bytes_done: self.bytes_received,
                });
            }
        }
        Ok(())
    }

    /// Legacy protocol: the n-th COPY OUT is the n-th tablespace, then the manifest.
    fn start_legacy_copy(&mut self) -> Result<(), ReplicationError> {
        let idx = self.copies_started;
        self.copies_started += 1;
        if let Some(ts) = self.tablespaces.get(idx) {
            self.pending.push_back(BaseBackupEvent::ArchiveStart {
                name: archive_name(ts.oid),
                tablespace_oid: ts.oid,
                location: ts.location.clone(),
            });
            self.tar = Some(TarReader::new());
            Ok(())
        } else if idx == self.tablespaces.len() && self.manifest_requested {
            self.in_manifest = true;
            Ok(())
        } else {
            Err(ReplicationError::protocol(
                "more COPY streams than tablespaces in BASE_BACKUP",
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_forms() {
        let opts = BaseBackupOptions {
            label: "nightly 'x'".into(),
            max_rate_kb: Some(1024),
            ..Default::default()
        };
        assert_eq!(
            command(&opts, 150018).unwrap(),
            "BASE_BACKUP ( LABEL 'nightly ''x''', PROGRESS, CHECKPOINT 'fast', WAL false, \
             MANIFEST 'yes', MANIFEST_CHECKSUMS 'CRC32C', TABLESPACE_MAP, WAIT false, MAX_RATE 1024 )"
        );
        assert_eq!(
            command(&opts, 140010).unwrap(),
            "BASE_BACKUP LABEL 'nightly ''x''' PROGRESS FAST TABLESPACE_MAP NOWAIT MAX_RATE 1024 \
             MANIFEST 'yes' MANIFEST_CHECKSUMS 'CRC32C'"
        );
        assert!(command(&opts, 120000).is_err());
        let incremental = BaseBackupOptions {
            incremental: true,
            ..opts
        };
        assert!(command(&incremental, 170004)
            .unwrap()
            .ends_with("MAX_RATE 1024, INCREMENTAL )"));
        assert!(command(&incremental, 160004).is_err());
    }

    #[test]
    fn archive_names() {
        assert_eq!(archive_name(None), "base.tar");
        assert_eq!(archive_name(Some(16384)), "16384.tar");
        let mut b = Bytes::from_static(b"16384.tar\0/srv/ts\0");
        assert_eq!(take_cstr(&mut b).unwrap(), "16384.tar");
        assert_eq!(take_cstr(&mut b).unwrap(), "/srv/ts");
        assert!(take_cstr(&mut b).is_err());
    }
}
