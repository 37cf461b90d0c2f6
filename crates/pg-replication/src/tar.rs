//! Incremental reader for the tar streams of BASE_BACKUP, with memory bounded by one header.
//!
//! PostgreSQL writes ustar headers itself (src/port/tarheader.c, `tarCreateHeader`): 512-byte
//! blocks, octal numbers (base-256 for sizes of 8 GiB and more), typeflags '0' file, '5'
//! directory, '2' symlink, data padded to 512 bytes. The server may or may not append the two
//! zero blocks that end an archive, so both forms are accepted. GNU 'L' long names are
//! understood in case a server ever sends them; pax headers are not used by PostgreSQL.
//! Member names are passed on as the server wrote them (the backup decides which it stores, see
//! `strata_repo::paths`), except names that are not UTF-8, which are refused: a lossy
//! conversion would store the file under another name.

use std::collections::VecDeque;

use bytes::Bytes;

use crate::{BaseBackupEvent, ReplicationError, TarEntry, TarEntryKind};

const BLOCK: usize = 512;
/// Largest `Data` event; bigger CopyData chunks are split.
const MAX_DATA_CHUNK: usize = 1024 * 1024;
/// Longest GNU long name we accept.
const MAX_LONG_NAME: u64 = 64 * 1024;

enum State {
    /// Collecting a 512-byte header.
    Header,
    /// Inside a file's contents.
    Data { remaining: u64 },
    /// Collecting a GNU long name.
    LongName { remaining: u64 },
    /// Skipping padding up to the next block boundary.
    Padding { remaining: u64 },
    /// Saw the end-of-archive zero block; the rest is ignored.
    Ended,
}

/// The parser: fed the archive's bytes in chunks of any size, it emits one
/// [`BaseBackupEvent::Entry`] per member followed by its contents as
/// [`BaseBackupEvent::Data`].
pub struct TarReader {
    state: State,
    header: Vec<u8>,
    long_name: Vec<u8>,
    pending_long_name: Option<String>,
    /// Padding owed after the current data or long name.
    pad_after: u64,
}

fn padding(size: u64) -> u64 {
    (BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64
}

fn tar_err(msg: impl Into<String>) -> ReplicationError {
    ReplicationError::protocol(format!("tar stream: {}", msg.into()))
}

/// A numeric header field: octal text, or base-256 when the high bit of the first byte is set.
fn parse_number(field: &[u8]) -> Result<u64, ReplicationError> {
    if let Some(&first) = field.first() {
        if first & 0x80 != 0 {
            let mut value: u64 = u64::from(first & 0x7f);
            for &b in &field[1..] {
                value = value
                    .checked_mul(256)
                    .and_then(|v| v.checked_add(u64::from(b)))
                    .ok_or_else(|| tar_err("numeric field overflows"))?;
            }
            return Ok(value);
        }
    }
    let text: Vec<u8> = field
        .iter()
        .copied()
        .take_while(|&b| b != 0)
        .filter(|&b| b != b' ')
        .collect();
    if text.is_empty() {
        return Ok(0);
    }
    let text = std::str::from_utf8(&text).map_err(|_| tar_err("non-ASCII numeric field"))?;
    u64::from_str_radix(text, 8).map_err(|_| tar_err(format!("bad octal field {text:?}")))
}

fn c_string(field: &[u8]) -> String {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    String::from_utf8_lossy(&field[..end]).into_owned()
}

/// A member name: up to the first NUL, and UTF-8 (a name with other bytes
/// is refused rather than stored under a replaced one that names another file).
fn name_string(field: &[u8]) -> Result<String, ReplicationError> {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    String::from_utf8(field[..end].to_vec()).map_err(|e| {
        tar_err(format!(
            "member name {:?} is not UTF-8",
            String::from_utf8_lossy(e.as_bytes())
        ))
    })
}

impl Default for TarReader {
    fn default() -> Self {
        Self::new()
    }
}

impl TarReader {
    /// A reader at the start of an archive.
    pub fn new() -> Self {
        TarReader {
            state: State::Header,
            header: Vec::with_capacity(BLOCK),
            long_name: Vec::new(),
            pending_long_name: None,
            pad_after: 0,
        }
    }

    /// Consumes one chunk of the archive, appending events to `out`.
    pub fn feed(
        &mut self,
        mut chunk: Bytes,
        out: &mut VecDeque<BaseBackupEvent>,
    ) -> Result<(), ReplicationError> {
        while !chunk.is_empty() {
            match &mut self.state {
                State::Ended => return Ok(()),
                State::Header => {
                    let take = (BLOCK - self.header.len()).min(chunk.len());
                    self.header.extend_from_slice(&chunk.split_to(take));
                    if self.header.len() == BLOCK {
                        let header = std::mem::take(&mut self.header);
                        self.header.reserve(BLOCK);
                        self.on_header(&header, out)?;
                    }
                }
                State::Data { remaining } => {
                    let take = (*remaining)
                        .min(chunk.len() as u64)
                        .min(MAX_DATA_CHUNK as u64) as usize;
                    out.push_back(BaseBackupEvent::Data(chunk.split_to(take)));
                    *remaining -= take as u64;
                    if *remaining == 0 {
                        self.state = State::Padding {
                            remaining: self.pad_after,
                        };
                    }
                }
                State::LongName { remaining } => {
                    let take = (*remaining).min(chunk.len() as u64) as usize;
                    self.long_name.extend_from_slice(&chunk.split_to(take));
                    *remaining -= take as u64;
                    if *remaining == 0 {
                        self.pending_long_name = Some(name_string(&self.long_name)?);
                        self.long_name.clear();
                        self.state = State::Padding {
                            remaining: self.pad_after,
                        };
                    }
                }
                State::Padding { remaining } => {
                    let take = (*remaining).min(chunk.len() as u64) as usize;
                    let _ = chunk.split_to(take);
                    *remaining -= take as u64;
                }
            }
            if matches!(self.state, State::Padding { remaining: 0 }) {
                self.state = State::Header;
            }
        }
        Ok(())
    }

    /// Whether the end-of-archive zero block was read (a file written by
    /// `pg_basebackup -Ft` always has it; a live stream may not).
    pub fn ended(&self) -> bool {
        matches!(self.state, State::Ended)
    }

    /// Checks that the archive ended on a member boundary.
    pub fn finish(&self) -> Result<(), ReplicationError> {
        match &self.state {
            State::Ended => Ok(()),
            State::Header if self.header.is_empty() && self.pending_long_name.is_none() => Ok(()),
            State::Padding { .. } => Ok(()),
            _ => Err(tar_err("archive ended in the middle of a member")),
        }
    }

    fn on_header(
        &mut self,
        h: &[u8],
        out: &mut VecDeque<BaseBackupEvent>,
    ) -> Result<(), ReplicationError> {
        if h.iter().all(|&b| b == 0) {
            self.state = State::Ended;
            return Ok(());
        }
        let stored_sum = parse_number(&h[148..156])?;
        let sum: u64 = h
            .iter()
            .enumerate()
            .map(|(i, &b)| {
                if (148..156).contains(&i) {
                    32
                } else {
                    u64::from(b)
                }
            })
            .sum();
        if sum != stored_sum {
            return Err(tar_err(format!(
                "header checksum mismatch (stored {stored_sum}, computed {sum})"
            )));
        }
        let size = parse_number(&h[124..136])?;
        let typeflag = h[156];
        self.pad_after = padding(size);
        if typeflag == b'L' {
            if size > MAX_LONG_NAME {
                return Err(tar_err(format!("long name of {size} bytes")));
            }
            self.state = State::LongName { remaining: size };
            return Ok(());
        }
        let path = match self.pending_long_name.take() {
            Some(name) => name,
            None => {
                let name = name_string(&h[0..100])?;
                let prefix = if &h[257..262] == b"ustar" {
                    name_string(&h[345..500])?
                } else {
                    String::new()
                };
                if prefix.is_empty() {
                    name
                } else {
                    format!("{prefix}/{name}")
                }
            }
        };
        let path = path.trim_end_matches('/').to_string();
        if path.is_empty() {
            return Err(tar_err("member with an empty name"));
        }
        let mode = parse_number(&h[100..108])? as u32;
        let mtime = parse_number(&h[136..148])? as i64;
        let (kind, data_size) = match typeflag {
            b'0' | 0 => (TarEntryKind::File, size),
            b'5' => (TarEntryKind::Directory, 0),
            b'2' => (
                TarEntryKind::Symlink {
                    target: c_string(&h[157..257]),
                },
                0,
            ),
            other => {
                return Err(tar_err(format!(
                    "unsupported member type {:?} for {path}",
                    char::from(other)
                )))
            }
        };
        out.push_back(BaseBackupEvent::Entry(TarEntry {
            path,
            kind,
            mode,
            size: data_size,
            mtime,
        }));
        self.pad_after = padding(data_size);
        self.state = if data_size > 0 {
            State::Data {
                remaining: data_size,
            }
        } else {
            State::Header
        };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(name: &str, typeflag: u8, size: u64, link: &str) -> Vec<u8> {
        let mut h = vec![0u8; BLOCK];
        h[..name.len()].copy_from_slice(name.as_bytes());
        h[100..108].copy_from_slice(b"0000600\0");
        h[108..116].copy_from_slice(b"0000000\0");
        h[116..124].copy_from_slice(b"0000000\0");
        h[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
        h[136..148].copy_from_slice(b"14000000000\0");
        h[156] = typeflag;
        h[157..157 + link.len()].copy_from_slice(link.as_bytes());
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
        h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        h
    }

    fn archive(with_trailer: bool) -> Vec<u8> {
        let mut a = Vec::new();
        a.extend(header("global/", b'5', 0, ""));
        a.extend(header("PG_VERSION", b'0', 3, ""));
        a.extend(b"15\n");
        a.extend(vec![0u8; BLOCK - 3]);
        a.extend(header("pg_tblspc/16384", b'2', 0, "/srv/ts"));
        let long = "x".repeat(150);
        a.extend(header("././@LongLink", b'L', long.len() as u64 + 1, ""));
        let mut name = long.clone().into_bytes();
        name.push(0);
        name.resize(BLOCK, 0);
        a.extend(name);
        a.extend(header("ignored", b'0', 1024, ""));
        a.extend(vec![7u8; 1024]);
        if with_trailer {
            a.extend(vec![0u8; 2 * BLOCK]);
        }
        a
    }

    fn parse_in_chunks(data: &[u8], chunk: usize) -> Vec<BaseBackupEvent> {
        let mut r = TarReader::new();
        let mut out = VecDeque::new();
        for piece in data.chunks(chunk) {
            r.feed(Bytes::copy_from_slice(piece), &mut out).unwrap();
        }
        r.finish().unwrap();
        out.into_iter().collect()
    }

    #[test]
    fn parses_members_whatever_the_chunking() {
        for trailer in [false, true] {
            for chunk in [1, 7, 512, 100_000] {
                let events = parse_in_chunks(&archive(trailer), chunk);
                let entries: Vec<&TarEntry> = events
                    .iter()
                    .filter_map(|e| match e {
                        BaseBackupEvent::Entry(t) => Some(t),
                        _ => None,
                    })
                    .collect();
                assert_eq!(entries.len(), 4);
                assert_eq!(entries[0].path, "global");
                assert_eq!(entries[0].kind, TarEntryKind::Directory);
                assert_eq!(entries[1].path, "PG_VERSION");
                assert_eq!(entries[1].size, 3);
                assert_eq!(entries[1].mode, 0o600);
                assert_eq!(entries[1].mtime, 0o14000000000);
                assert_eq!(
                    entries[2].kind,
                    TarEntryKind::Symlink {
                        target: "/srv/ts".into()
                    }
                );
                assert_eq!(entries[3].path, "x".repeat(150));
                let data: usize = events
                    .iter()
                    .map(|e| match e {
                        BaseBackupEvent::Data(d) => d.len(),
                        _ => 0,
                    })
                    .sum();
                assert_eq!(data, 3 + 1024);
            }
        }
    }

    #[test]
    fn rejects_corruption_and_truncation() {
        let mut a = archive(false);
        a[0] = b'Q';
        let mut r = TarReader::new();
        assert!(r.feed(Bytes::from(a), &mut VecDeque::new()).is_err());

        let a = archive(false);
        let mut r = TarReader::new();
        r.feed(
            Bytes::copy_from_slice(&a[..BLOCK + 2]),
            &mut VecDeque::new(),
        )
        .unwrap();
        assert!(r.finish().is_err());
    }

    /// Names are passed on as the server wrote them (the backup checks
    /// them), except bytes that are not UTF-8, which no name can carry.
    #[test]
    fn hostile_names_are_reported_verbatim_or_refused() {
        for name in ["/etc/passwd", "../../x", "base//x", "pg_tblspc/1/../../y"] {
            let mut a = header(name, b'0', 0, "");
            a.extend(vec![0u8; 2 * BLOCK]);
            let events = parse_in_chunks(&a, 512);
            assert!(
                matches!(&events[0], BaseBackupEvent::Entry(e) if e.path == name),
                "{name}"
            );
        }
        let mut h = header("base/x", b'0', 0, "");
        h[5] = 0xff;
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
        h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        let err = TarReader::new()
            .feed(Bytes::from(h), &mut VecDeque::new())
            .unwrap_err();
        assert!(err.to_string().contains("not UTF-8"), "{err}");
    }

    #[test]
    fn base256_sizes() {
        let mut field = [0u8; 12];
        field[0] = 0x80;
        field[7] = 0x02; // 2 << 32
        assert_eq!(parse_number(&field).unwrap(), 2 << 32);
        assert_eq!(parse_number(b"00000001750\0").unwrap(), 1000);
    }
}
