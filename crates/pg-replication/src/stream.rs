//! START_REPLICATION PHYSICAL: the CopyBoth stream of WAL and keepalives, and standby status
//! updates back. Reference: doc/src/sgml/protocol.sgml ("START_REPLICATION", "XLogData",
//! "Primary keepalive message", "Standby status update"); src/backend/replication/walsender.c
//! (`StartReplication`, `ProcessStandbyReplyMessage`); src/bin/pg_basebackup/receivelog.c.

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;

use crate::client::{log_notice, parse_lsn, parse_num, quote_ident, required_str, ConnState};
use crate::conn::{data_row_columns, server_error, Backend};
use crate::{Lsn, ReplicationClient, ReplicationError, TimelineId};

/// Seconds from the Unix epoch to PostgreSQL's epoch, 2000-01-01 00:00:00 UTC.
const PG_EPOCH_OFFSET_SECS: i64 = 946_684_800;

/// A message of the COPY BOTH stream of START_REPLICATION.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicationMessage {
    /// WAL bytes starting at `start`.
    XLogData {
        /// WAL position of the first byte of `data`.
        start: Lsn,
        /// The server's current end of WAL.
        server_wal_end: Lsn,
        /// The WAL bytes.
        data: Bytes,
    },
    /// The server is alive; with `reply_requested` it wants a status update now.
    Keepalive {
        /// The server's current end of WAL.
        server_wal_end: Lsn,
        /// True when the server wants a status update now.
        reply_requested: bool,
    },
    /// The requested timeline ended on the server; continue on `next_timeline` at `next_start`.
    EndOfTimeline {
        /// The timeline that follows.
        next_timeline: TimelineId,
        /// Where it starts.
        next_start: Lsn,
    },
}

enum State {
    /// Inside CopyBoth.
    Streaming,
    /// CopyDone was queued (ours, or in answer to the server's); reading the optional
    /// next-timeline result set up to ReadyForQuery.
    Ending {
        next: Option<(TimelineId, Lsn)>,
        error: Option<ReplicationError>,
    },
    /// Back in command mode; the end-of-timeline message, if any, is yet to be handed out.
    Ended(Option<ReplicationMessage>),
    /// Back in command mode, nothing left to report.
    Finished,
}

/// A running physical replication stream. Call [`ReplicationStream::stop`] to return the
/// connection to command mode; dropping the stream leaves the connection unusable.
pub struct ReplicationStream<'a> {
    client: &'a mut ReplicationClient,
    state: State,
}

/// Microseconds since the PostgreSQL epoch, as in `GetCurrentTimestamp()`.
fn pg_now_micros() -> i64 {
    let since_unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    since_unix.as_micros() as i64 - PG_EPOCH_OFFSET_SECS * 1_000_000
}

fn parse_copy_data(mut data: Bytes) -> Result<ReplicationMessage, ReplicationError> {
    let kind = *data
        .first()
        .ok_or_else(|| ReplicationError::protocol("empty CopyData in replication stream"))?;
    data.advance(1);
    match kind {
        b'w' => {
            if data.len() < 24 {
                return Err(ReplicationError::protocol("short XLogData header"));
            }
            let start = Lsn(data.get_u64());
            let server_wal_end = Lsn(data.get_u64());
            let _send_time = data.get_i64();
            Ok(ReplicationMessage::XLogData {
                start,
                server_wal_end,
                data,
            })
        }
        b'k' => {
            if data.len() != 17 {
                return Err(ReplicationError::protocol("bad keepalive length"));
            }
            let server_wal_end = Lsn(data.get_u64());
            let _send_time = data.get_i64();
            let reply_requested = data.get_u8() != 0;
            Ok(ReplicationMessage::Keepalive {
                server_wal_end,
                reply_requested,
            })
        }
        other => Err(ReplicationError::protocol(format!(
            "unknown replication message type {:?}",
            char::from(other)
        ))),
    }
}

fn next_timeline_row(row: &[Option<Bytes>]) -> Result<(TimelineId, Lsn), ReplicationError> {
    const WHAT: &str = "end-of-timeline result";
    Ok((
        TimelineId(parse_num(required_str(row, 0, WHAT)?, WHAT)?),
        parse_lsn(required_str(row, 1, WHAT)?, WHAT)?,
    ))
}

impl ReplicationClient {
    /// `START_REPLICATION [SLOT s] PHYSICAL start [TIMELINE t]`.
    pub async fn start_replication(
        &mut self,
        slot: Option<&str>,
        start: Lsn,
        timeline: Option<TimelineId>,
    ) -> Result<ReplicationStream<'_>, ReplicationError> {
        self.ensure_ready()?;
        let mut sql = String::from("START_REPLICATION");
        if let Some(slot) = slot {
            sql.push_str(&format!(" SLOT {}", quote_ident(slot)));
        }
        sql.push_str(&format!(" PHYSICAL {start}"));
        if let Some(tli) = timeline {
            sql.push_str(&format!(" TIMELINE {}", tli.0));
        }
        frontend::query(&sql, self.conn.out())?;
        self.conn.flush().await?;
        self.state = ConnState::Busy;
        // Starting exactly at the end of a historic timeline skips the copy entirely: the server
        // answers with the next-timeline result set straight away.
        let mut stream = ReplicationStream {
            client: self,
            state: State::Ending {
                next: None,
                error: None,
            },
        };
        loop {
            match stream.client.conn.read_message().await? {
                Backend::CopyBothResponse => {
                    stream.state = State::Streaming;
                    return Ok(stream);
                }
                Backend::Message(msg) => {
                    stream.on_ending_message(msg)?;
                    match &stream.state {
                        State::Ended(Some(_)) => return Ok(stream),
                        State::Ended(None) => {
                            return Err(ReplicationError::protocol(
                                "START_REPLICATION returned neither a stream nor a next timeline",
                            ))
                        }
                        _ => {}
                    }
                }
            }
        }
    }
}

impl ReplicationStream<'_> {
    /// Whether the next message is already received (reading it waits for
    /// nothing). Lets a caller pause between socket reads while the
    /// server's messages come small and one at a time.
    pub fn has_buffered_message(&self) -> bool {
        self.client.conn.has_buffered_message()
    }

    /// Holds back the socket's readiness until `bytes` have arrived, so
    /// packets that come during a pause do not each wake the runtime; `1`
    /// ends the hold, and what arrived meanwhile is reported at once.
    pub fn hold_reads_below(&self, bytes: usize) -> Result<(), ReplicationError> {
        Ok(self.client.conn.set_read_low_water(bytes)?)
    }

    /// The next message from the server; `None` after the stream has ended and the connection
    /// is back in command mode. Cancellation-safe: partial frames stay buffered, so it can sit
    /// in `tokio::select!` beside a ticker.
    pub async fn next(&mut self) -> Result<Option<ReplicationMessage>, ReplicationError> {
        loop {
            match &mut self.state {
                State::Finished => return Ok(None),
                State::Ended(pending) => {
                    let msg = pending.take();
                    self.state = State::Finished;
                    return Ok(msg);
                }
                State::Streaming => {
                    let msg = self.client.conn.read_regular("while streaming").await?;
                    match msg {
                        Message::CopyData(body) => {
                            return parse_copy_data(body.into_bytes()).map(Some)
                        }
                        Message::CopyDone => {
                            // The timeline ended on the server; acknowledge to leave copy mode.
                            frontend::copy_done(self.client.conn.out());
                            self.state = State::Ending {
                                next: None,
                                error: None,
                            };
                        }
                        Message::ErrorResponse(body) => {
                            self.state = State::Ending {
                                next: None,
                                error: Some(server_error(&body)),
                            };
                        }
                        Message::NoticeResponse(body) => log_notice(&body),
                        Message::ParameterStatus(body) => self.client.on_parameter_status(&body)?,
                        _ => {
                            return Err(ReplicationError::protocol(
                                "unexpected message in replication stream",
                            ))
                        }
                    }
                }
                State::Ending { .. } => {
                    let read = match self.client.conn.flush().await {
                        Ok(()) => {
                            self.client
                                .conn
                                .read_regular("while ending the stream")
                                .await
                        }
                        Err(e) => Err(e),
                    };
                    match read {
                        Ok(msg) => self.on_ending_message(msg)?,
                        // A server that sent an error and closed the
                        // connection (a FATAL: terminated, shutting down)
                        // ended the stream for the reason it gave.
                        // The stream stays ending: a later `next` or
                        // `stop` meets the broken connection again.
                        Err(e) => {
                            return Err(match &mut self.state {
                                State::Ending { error, .. } => error.take().unwrap_or(e),
                                _ => e,
                            })
                        }
                    }
                }
            }
        }
    }

    /// One message after the copy ended; on ReadyForQuery the connection is free again.
    fn on_ending_message(&mut self, msg: Message) -> Result<(), ReplicationError> {
        let State::Ending { next, error } = &mut self.state else {
            return Err(ReplicationError::protocol("stream is not ending"));
        };
        match msg {
            // WAL already in flight when we sent CopyDone, the server's own CopyDone, and the
            // result set's framing carry nothing we need.
            Message::CopyData(_)
            | Message::CopyDone
            | Message::RowDescription(_)
            | Message::CommandComplete(_) => Ok(()),
            Message::DataRow(body) => {
                *next = Some(next_timeline_row(&data_row_columns(&body)?)?);
                Ok(())
            }
            Message::NoticeResponse(body) => {
                log_notice(&body);
                Ok(())
            }
            Message::ParameterStatus(body) => self.client.on_parameter_status(&body),
            Message::ErrorResponse(body) => {
                *error = Some(server_error(&body));
                Ok(())
            }
            Message::ReadyForQuery(_) => {
                self.client.state = ConnState::Ready;
                let next = next.take();
                if let Some(e) = error.take() {
                    self.state = State::Finished;
                    return Err(e);
                }
                self.state = State::Ended(next.map(|(next_timeline, next_start)| {
                    ReplicationMessage::EndOfTimeline {
                        next_timeline,
                        next_start,
                    }
                }));
                Ok(())
            }
            _ => Err(ReplicationError::protocol(
                "unexpected message while leaving the replication stream",
            )),
        }
    }

    /// Sends a standby status update ('r'): positions written, flushed to disk, and applied.
    /// Once the stream is ending (the server ended the timeline or sent an error, seen by a
    /// [`ReplicationStream::next`] that may have been cancelled since) there is nothing to
    /// report: nothing is sent, and `next` goes on to what ended it.
    pub async fn send_status(
        &mut self,
        written: Lsn,
        flushed: Lsn,
        applied: Lsn,
        reply_requested: bool,
    ) -> Result<(), ReplicationError> {
        if !matches!(self.state, State::Streaming) {
            return Ok(());
        }
        let mut payload = BytesMut::with_capacity(34);
        payload.put_u8(b'r');
        payload.put_u64(written.0);
        payload.put_u64(flushed.0);
        payload.put_u64(applied.0);
        payload.put_i64(pg_now_micros());
        payload.put_u8(u8::from(reply_requested));
        frontend::CopyData::new(payload.freeze())?.write(self.client.conn.out());
        self.client.conn.flush().await
    }

    /// Ends streaming (CopyDone) and reads up to ReadyForQuery, so the client can issue commands
    /// again. WAL still in flight is discarded.
    pub async fn stop(mut self) -> Result<(), ReplicationError> {
        if matches!(self.state, State::Streaming) {
            frontend::copy_done(self.client.conn.out());
            self.state = State::Ending {
                next: None,
                error: None,
            };
        }
        while let State::Ending { .. } = self.state {
            self.client.conn.flush().await?;
            let msg = match self.client.conn.read_message().await? {
                Backend::Message(m) => m,
                Backend::CopyBothResponse => {
                    return Err(ReplicationError::protocol(
                        "CopyBothResponse while stopping",
                    ))
                }
            };
            self.on_ending_message(msg)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_xlogdata_and_keepalive() {
        let mut w = BytesMut::new();
        w.put_u8(b'w');
        w.put_u64(0x0100_0000);
        w.put_u64(0x0200_0000);
        w.put_i64(0);
        w.put_slice(b"wal");
        assert_eq!(
            parse_copy_data(w.freeze()).unwrap(),
            ReplicationMessage::XLogData {
                start: Lsn(0x0100_0000),
                server_wal_end: Lsn(0x0200_0000),
                data: Bytes::from_static(b"wal"),
            }
        );
        let mut k = BytesMut::new();
        k.put_u8(b'k');
        k.put_u64(42);
        k.put_i64(0);
        k.put_u8(1);
        assert_eq!(
            parse_copy_data(k.freeze()).unwrap(),
            ReplicationMessage::Keepalive {
                server_wal_end: Lsn(42),
                reply_requested: true,
            }
        );
        assert!(parse_copy_data(Bytes::from_static(b"w123")).is_err());
        assert!(parse_copy_data(Bytes::from_static(b"z")).is_err());
    }

    #[test]
    fn pg_epoch_clock() {
        // 2020-01-01 is 20 years after the PostgreSQL epoch; now is later than that.
        assert!(pg_now_micros() > 631_152_000_000_000);
    }
}
