//! Importing a pgBackRest repository: every backup a stanza lists in
//! `backup/<stanza>/backup.info`, and the archived WAL from each backup's
//! start on, becomes a backup set of an instance, so that its history
//! restores from Strata.
//!
//! Nothing of pgBackRest runs: its repository format is read directly.
//! `backup.info` and each backup's `backup.manifest` are INI files whose
//! values are JSON; a manifest lists every file of the data directory
//! (`[target:file]`, with size, SHA-1 and, for a differential or
//! incremental backup, the prior backup that holds it) and every directory
//! (`[target:path]`). Files are stored under `<label>/pg_data/`, each
//! compressed alone (`option-compress-type`: gz and zst are read, lz4 and
//! bz2 are refused); WAL segments under
//! `archive/<stanza>/<version>-<db id>/<16 hex>/<segment>-<sha1>[.ext]`.
//!
//! Each backup is read as the tar stream `pg_basebackup -Ft` would have
//! written (headers made from the manifest, contents decompressed and
//! their SHA-1 checked as they pass), its WAL as a `pg_wal.tar`, and both
//! go through the import of [`crate::import`]: the same first pass that
//! refuses before anything is stored, the same receiver. Every name from
//! a manifest or a directory listing is checked before it reaches a path.
//! Tablespaces (`pg_tblspc/<oid>/…`) become archives of their own, placed
//! by the backup's `tablespace_map`. Encrypted repositories, bundled files
//! (`repo-bundle`), block incremental backups and other links in the data
//! directory are refused.
//!
//! Reference: pgBackRest's src/info/infoBackup.c, src/info/manifest.c,
//! src/command/archive/common.c (the layout), src/common/ini.c.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use pg_wal::{Lsn, TimelineId, WalGeometry};
use serde_json::Value;
use sha1::{Digest, Sha1};
use strata_catalog::BackupSet;
use strata_repo::FileKind;

use crate::beneath::Beneath;
use crate::blocking::blocking;
use crate::import::{Archive, ImportDir, Role, TarSource};
use crate::{Engine, EngineError, EngineResult, Progress};

/// Largest `backup.info`, `archive.info` or `backup.manifest` read.
const MAX_INFO: u64 = 1 << 30;
/// Largest WAL segment PostgreSQL writes (`--wal-segsize` 1024).
const MAX_SEGMENT: u64 = 1 << 30;

fn refused(msg: impl Into<String>) -> EngineError {
    EngineError::Refused(msg.into())
}

/// An INI file as pgBackRest writes it: `[section]` lines, then
/// `key=value` lines whose values are JSON.
#[derive(Debug)]
struct Ini {
    name: String,
    sections: HashMap<String, Vec<(String, String)>>,
}

impl Ini {
    fn parse(name: &str, text: &[u8]) -> EngineResult<Ini> {
        let text = std::str::from_utf8(text).map_err(|_| {
            refused(format!(
                "{name} is not text: not a pgBackRest file, or an encrypted repository (not supported)"
            ))
        })?;
        let mut sections: HashMap<String, Vec<(String, String)>> = HashMap::new();
        let mut current: Option<String> = None;
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            if let Some(section) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                sections.entry(section.to_string()).or_default();
                current = Some(section.to_string());
                continue;
            }
            let (Some(section), Some((key, value))) = (current.as_ref(), line.split_once('='))
            else {
                return Err(refused(format!("{name}: unreadable line {line:?}")));
            };
            sections
                .entry(section.clone())
                .or_default()
                .push((key.to_string(), value.to_string()));
        }
        Ok(Ini {
            name: name.to_string(),
            sections,
        })
    }

    fn section(&self, name: &str) -> &[(String, String)] {
        self.sections.get(name).map(Vec::as_slice).unwrap_or(&[])
    }

    fn json(&self, key: &str, value: &str) -> EngineResult<Value> {
        serde_json::from_str(value)
            .map_err(|e| refused(format!("{}: {key} is not JSON: {e}", self.name)))
    }

    fn get(&self, section: &str, key: &str) -> EngineResult<Option<Value>> {
        match self.section(section).iter().find(|(k, _)| k == key) {
            Some((k, v)) => self.json(k, v).map(Some),
            None => Ok(None),
        }
    }

    fn need(&self, section: &str, key: &str) -> EngineResult<Value> {
        self.get(section, key)?
            .ok_or_else(|| refused(format!("{}: no {key} in [{section}]", self.name)))
    }
}

fn as_str<'a>(ini: &Ini, key: &str, v: &'a Value) -> EngineResult<&'a str> {
    v.as_str()
        .ok_or_else(|| refused(format!("{}: {key} is not a string", ini.name)))
}

fn as_u64(ini: &Ini, key: &str, v: &Value) -> EngineResult<u64> {
    v.as_u64()
        .ok_or_else(|| refused(format!("{}: {key} is not a number", ini.name)))
}

/// Reads the file `rel` of the repository `repo`: opened one component at
/// a time beneath it, so a link anywhere on the way (a label directory, a
/// WAL directory, a file) is refused, not followed out of the repository.
fn open_file(repo: &Path, rel: &str) -> EngineResult<File> {
    let path = repo.join(rel);
    let cannot = |e: std::io::Error| refused(format!("cannot open {}: {e}", path.display()));
    let file = Beneath::open(repo)
        .and_then(|root| root.open_read(rel))
        .map_err(cannot)?
        .ok_or_else(|| refused(format!("{} does not exist", path.display())))?;
    let meta = file
        .metadata()
        .map_err(|e| refused(format!("{}: {e}", path.display())))?;
    if !meta.is_file() {
        return Err(refused(format!("{} is not a regular file", path.display())));
    }
    Ok(file)
}

fn read_info(repo: &Path, rel: &str) -> EngineResult<Ini> {
    let path = repo.join(rel);
    let path = path.as_path();
    let mut text = Vec::new();
    open_file(repo, rel)?
        .take(MAX_INFO + 1)
        .read_to_end(&mut text)
        .map_err(|e| refused(format!("reading {}: {e}", path.display())))?;
    if text.len() as u64 > MAX_INFO {
        return Err(refused(format!("{} is too large", path.display())));
    }
    Ini::parse(&path.display().to_string(), &text)
}

/// A stanza name: letters, digits, `-`, `_` and `.`, not leading.
fn valid_stanza(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// A database version of `[db:history]`, which names the WAL directory:
/// `<major>` or `<major>.<minor>` in digits (`15`, `9.6`).
fn valid_db_version(version: &str) -> bool {
    let number = |p: &str| !p.is_empty() && p.len() <= 4 && p.bytes().all(|b| b.is_ascii_digit());
    match version.split_once('.') {
        Some((major, minor)) => number(major) && number(minor),
        None => number(version),
    }
}

/// A backup label: `YYYYMMDD-HHMMSSF`, with `_YYYYMMDD-HHMMSS[DI]` after
/// it for a differential or incremental backup.
fn valid_label(label: &str) -> bool {
    let stamp = |s: &[u8]| {
        s.len() == 15
            && s[8] == b'-'
            && s.iter()
                .enumerate()
                .all(|(i, b)| i == 8 || b.is_ascii_digit())
    };
    let b = label.as_bytes();
    match b.len() {
        16 => stamp(&b[..15]) && b[15] == b'F',
        33 => {
            stamp(&b[..15])
                && b[15] == b'F'
                && b[16] == b'_'
                && stamp(&b[17..32])
                && matches!(b[32], b'D' | b'I')
        }
        _ => false,
    }
}

/// How a file of the repository is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    fn from_type(kind: &str) -> EngineResult<Compression> {
        match kind {
            "none" => Ok(Compression::None),
            "gz" => Ok(Compression::Gzip),
            "zst" => Ok(Compression::Zstd),
            other => Err(refused(format!(
                "the repository is compressed with {other:?}: Strata reads gz, zst or uncompressed repositories"
            ))),
        }
    }

    fn extension(self) -> &'static str {
        match self {
            Compression::None => "",
            Compression::Gzip => ".gz",
            Compression::Zstd => ".zst",
        }
    }

    fn decoder(self, file: File, name: &str) -> std::io::Result<Box<dyn Read + Send>> {
        Ok(match self {
            Compression::None => Box::new(file),
            Compression::Gzip => {
                Box::new(flate2::read::GzDecoder::new(std::io::BufReader::new(file)))
            }
            Compression::Zstd => Box::new(
                zstd::stream::read::Decoder::new(file)
                    .map_err(|e| std::io::Error::other(format!("{name}: zstd: {e}")))?,
            ),
        })
    }
}

/// A directory of a backup, from its manifest.
#[derive(Debug, Clone)]
struct BackupDir {
    tablespace: Option<u32>,
    path: String,
    mode: u32,
}

/// A file of a backup, from its manifest.
#[derive(Debug, Clone)]
struct BackupFile {
    /// `None`: the data directory.
    tablespace: Option<u32>,
    /// Relative to the data directory or the tablespace's directory.
    path: String,
    /// The backup whose directory holds it (itself, or a prior one).
    stored_in: String,
    size: u64,
    sha1: Option<[u8; 20]>,
    mode: u32,
    mtime: u64,
}

/// An archived WAL segment.
#[derive(Debug, Clone)]
struct ArchivedSegment {
    name: String,
    /// The repository.
    repo: PathBuf,
    /// The file, relative to `repo`.
    file: String,
    sha1: [u8; 20],
    compression: Compression,
}

/// A backup of the stanza, read from its manifest.
#[derive(Debug)]
struct RepoBackup {
    label: String,
    kind: String,
    /// The repository.
    repo: PathBuf,
    /// The stanza, checked by [`valid_stanza`].
    stanza: String,
    compression: Compression,
    start: Lsn,
    stop: Lsn,
    archive_start: String,
    archive_stop: String,
    timeline: TimelineId,
    /// `backup-timestamp-stop`.
    ended_at: Option<DateTime<Utc>>,
    tablespaces: Vec<u32>,
    dirs: Vec<BackupDir>,
    files: Vec<BackupFile>,
    /// The WAL imported with it: from its start on, without a gap.
    segments: Vec<ArchivedSegment>,
}

fn parse_sha1(text: &str) -> Option<[u8; 20]> {
    let mut out = [0u8; 20];
    (text.len() == 40 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
        .then(|| hex::decode_to_slice(text, &mut out).ok())
        .flatten()
        .map(|()| out)
}

fn parse_mode(ini: &Ini, v: Option<&Value>, default: u32) -> EngineResult<u32> {
    match v {
        None => Ok(default),
        Some(v) => as_str(ini, "mode", v).and_then(|m| {
            u32::from_str_radix(m, 8)
                .ok()
                .filter(|m| *m <= 0o7777)
                .ok_or_else(|| refused(format!("{}: bad mode {m:?}", ini.name)))
        }),
    }
}

/// Where a manifest name lives: `pg_data/<path>` in the data directory,
/// `pg_tblspc/<oid>/<path>` in tablespace `oid` (one of `tablespaces`).
/// Refused unless a restore may write it there.
fn data_path(
    ini: &Ini,
    name: &str,
    kind: FileKind,
    tablespaces: &[u32],
) -> EngineResult<(Option<u32>, String)> {
    let outside = || {
        refused(format!(
            "{}: {name:?} is outside the data directory and its tablespaces",
            ini.name
        ))
    };
    let (tablespace, rest) = match name.strip_prefix("pg_data/") {
        Some(rest) => (None, rest),
        None => {
            let (oid, rest) = name
                .strip_prefix("pg_tblspc/")
                .and_then(|r| r.split_once('/'))
                .ok_or_else(outside)?;
            let oid = tablespaces
                .iter()
                .find(|t| t.to_string() == oid)
                .ok_or_else(outside)?;
            (Some(*oid), rest)
        }
    };
    strata_repo::paths::check_entry(tablespace, rest, kind)
        .map_err(|e| refused(format!("{}: refusing the entry {name:?}: {e}", ini.name)))?;
    Ok((tablespace, rest.to_string()))
}

/// The tablespaces of a backup (`[backup:target]` links named
/// `pg_tblspc/<oid>`); any other target or link is refused.
fn tablespaces(ini: &Ini, label: &str) -> EngineResult<Vec<u32>> {
    let other = |name: &str| {
        refused(format!(
            "backup {label} has the link {name:?} in its data directory: Strata imports the data directory and its tablespaces only"
        ))
    };
    let mut oids = Vec::new();
    for (name, value) in ini.section("backup:target") {
        if name == "pg_data" {
            continue;
        }
        let v = ini.json(name, value)?;
        let oid = name
            .strip_prefix("pg_tblspc/")
            .filter(|o| !o.starts_with('0') && o.len() <= 10)
            .and_then(|o| o.parse::<u32>().ok())
            .filter(|o| v.get("tablespace-id").and_then(Value::as_str) == Some(&o.to_string()))
            .filter(|_| v.get("type").and_then(Value::as_str) == Some("link"))
            .ok_or_else(|| other(name))?;
        oids.push(oid);
    }
    for (name, _) in ini.section("target:link") {
        let known = name
            .strip_prefix("pg_data/pg_tblspc/")
            .is_some_and(|o| oids.iter().any(|t| t.to_string() == o));
        if !known {
            return Err(other(name));
        }
    }
    Ok(oids)
}

/// Reads the manifest of backup `label`.
fn read_manifest(
    repo: &Path,
    stanza: &str,
    label: &str,
    system_id: u64,
) -> EngineResult<RepoBackup> {
    let ini = read_info(repo, &format!("backup/{stanza}/{label}/backup.manifest"))?;
    let text = |section: &str, key: &str| -> EngineResult<String> {
        as_str(&ini, key, &ini.need(section, key)?).map(str::to_string)
    };
    if text("backup", "backup-label")? != label {
        return Err(refused(format!(
            "{}: it names another backup than {label}",
            ini.name
        )));
    }
    let kind = text("backup", "backup-type")?;
    let sysid = as_u64(
        &ini,
        "db-system-id",
        &ini.need("backup:db", "db-system-id")?,
    )?;
    if sysid != system_id {
        return Err(refused(format!(
            "backup {label} is of the cluster with system identifier {sysid}, the stanza's is {system_id}"
        )));
    }
    if let Some(cipher) = ini.get("backup:option", "option-cipher-type")? {
        if cipher.as_str() != Some("none") {
            return Err(refused(format!(
                "backup {label} is encrypted: encrypted pgBackRest repositories are not supported (restore with pgBackRest, then import with pg_basebackup)"
            )));
        }
    }
    let compression = match ini.get("backup:option", "option-compress-type")? {
        Some(v) => Compression::from_type(as_str(&ini, "option-compress-type", &v)?)?,
        // Before pgBackRest 2.27: a boolean, gzip when true.
        None => match ini.get("backup:option", "option-compress")? {
            Some(Value::Bool(true)) => Compression::Gzip,
            _ => Compression::None,
        },
    };
    if !ini
        .section("backup:target")
        .iter()
        .any(|(k, _)| k == "pg_data")
    {
        return Err(refused(format!("{}: no pg_data target", ini.name)));
    }
    let tablespaces = tablespaces(&ini, label)?;
    let references: Vec<String> = match ini.get("backup", "backup-reference")? {
        Some(v) => as_str(&ini, "backup-reference", &v)?
            .split(',')
            .map(str::to_string)
            .collect(),
        None => Vec::new(),
    };
    let file_mode = parse_mode(
        &ini,
        ini.get("target:file:default", "mode")?.as_ref(),
        0o600,
    )?;
    let dir_mode = parse_mode(
        &ini,
        ini.get("target:path:default", "mode")?.as_ref(),
        0o700,
    )?;
    let mut dirs = Vec::new();
    for (name, value) in ini.section("target:path") {
        // The roots: the data directory, `pg_tblspc` and each tablespace's.
        let root = name == "pg_data"
            || name == "pg_tblspc"
            || name
                .strip_prefix("pg_tblspc/")
                .is_some_and(|o| tablespaces.iter().any(|t| t.to_string() == o));
        if root {
            continue;
        }
        let (tablespace, path) = data_path(&ini, name, FileKind::Dir, &tablespaces)?;
        let v = ini.json(name, value)?;
        dirs.push(BackupDir {
            tablespace,
            path,
            mode: parse_mode(&ini, v.get("mode"), dir_mode)?,
        });
    }
    let mut files = Vec::new();
    for (name, value) in ini.section("target:file") {
        let (tablespace, path) = data_path(&ini, name, FileKind::File, &tablespaces)?;
        let v = ini.json(name, value)?;
        if v.get("bni").is_some() || v.get("bi").is_some() {
            return Err(refused(format!(
                "backup {label} stores files in bundles or block-incremental form (repo-bundle, repo-block): not supported"
            )));
        }
        let size = as_u64(&ini, name, v.get("size").unwrap_or(&Value::Null))?;
        let sha1 = match v.get("checksum") {
            Some(c) => Some(
                c.as_str()
                    .and_then(parse_sha1)
                    .ok_or_else(|| refused(format!("{}: {name}: bad checksum", ini.name)))?,
            ),
            None if size == 0 => None,
            None => return Err(refused(format!("{}: {name} has no checksum", ini.name))),
        };
        let stored_in = match v.get("reference") {
            Some(r) => {
                let r = as_str(&ini, "reference", r)?;
                if !valid_label(r) || !references.iter().any(|x| x == r) {
                    return Err(refused(format!(
                        "{}: {name} refers to {r:?}, not a backup this one depends on",
                        ini.name
                    )));
                }
                r.to_string()
            }
            None => label.to_string(),
        };
        files.push(BackupFile {
            tablespace,
            path,
            stored_in,
            size,
            sha1,
            mode: parse_mode(&ini, v.get("mode"), file_mode)?,
            mtime: v.get("timestamp").and_then(Value::as_u64).unwrap_or(0),
        });
    }
    let lsn = |key: &str| -> EngineResult<Lsn> {
        text("backup", key)?
            .parse()
            .map_err(|_| refused(format!("{}: {key} is not a WAL position", ini.name)))
    };
    let archive_start = text("backup", "backup-archive-start")?;
    let timeline = archive_start
        .get(..8)
        .and_then(|t| u32::from_str_radix(t, 16).ok())
        .filter(|_| archive_start.len() == 24)
        .map(TimelineId)
        .ok_or_else(|| refused(format!("{}: bad backup-archive-start", ini.name)))?;
    Ok(RepoBackup {
        label: label.to_string(),
        kind,
        repo: repo.to_path_buf(),
        stanza: stanza.to_string(),
        compression,
        start: lsn("backup-lsn-start")?,
        stop: lsn("backup-lsn-stop")?,
        archive_start,
        archive_stop: text("backup", "backup-archive-stop")?,
        timeline,
        tablespaces,
        ended_at: ini
            .get("backup", "backup-timestamp-stop")?
            .and_then(|v| v.as_i64())
            .and_then(|t| DateTime::from_timestamp(t, 0)),
        dirs,
        files,
        segments: Vec::new(),
    })
}

/// The archived WAL of one database of the stanza, by segment name.
struct WalArchive {
    segments: BTreeMap<String, Vec<ArchivedSegment>>,
}

impl WalArchive {
    /// The WAL of `rel`, a directory of the repository `repo`.
    fn scan(repo: &Path, rel: &str) -> EngineResult<WalArchive> {
        let dir = &repo.join(rel);
        let mut segments: BTreeMap<String, Vec<ArchivedSegment>> = BTreeMap::new();
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(WalArchive { segments })
            }
            Err(e) => return Err(refused(format!("cannot read {}: {e}", dir.display()))),
        };
        for entry in entries {
            let entry = entry.map_err(|e| refused(format!("{}: {e}", dir.display())))?;
            let sub = entry.file_name().to_string_lossy().into_owned();
            let hex16 = sub.len() == 16 && sub.bytes().all(|b| b.is_ascii_hexdigit());
            if !hex16 || !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let sub_dir = dir.join(&sub);
            let files = std::fs::read_dir(&sub_dir)
                .map_err(|e| refused(format!("cannot read {}: {e}", sub_dir.display())))?;
            for file in files {
                let file = file.map_err(|e| refused(format!("{}: {e}", sub_dir.display())))?;
                let name = file.file_name().to_string_lossy().into_owned();
                let Some((segment, rest)) = name.split_once('-') else {
                    continue;
                };
                let (sum, ext) = rest.split_at(rest.find('.').unwrap_or(rest.len()));
                let compression = match ext {
                    "" => Some(Compression::None),
                    ".gz" => Some(Compression::Gzip),
                    ".zst" => Some(Compression::Zstd),
                    _ => None,
                };
                let (Some(sha1), true) = (
                    parse_sha1(sum),
                    segment.len() == 24
                        && segment.starts_with(&sub)
                        && segment
                            .bytes()
                            .all(|b| matches!(b, b'0'..=b'9' | b'A'..=b'F')),
                ) else {
                    continue;
                };
                let Some(compression) = compression else {
                    return Err(refused(format!(
                        "WAL segment {name} is compressed as {ext:?}: Strata reads gz, zst or uncompressed WAL"
                    )));
                };
                segments
                    .entry(segment.to_string())
                    .or_default()
                    .push(ArchivedSegment {
                        name: segment.to_string(),
                        repo: repo.to_path_buf(),
                        file: format!("{rel}/{sub}/{name}"),
                        sha1,
                        compression,
                    });
            }
        }
        Ok(WalArchive { segments })
    }

    fn get(&self, name: &str) -> EngineResult<Option<&ArchivedSegment>> {
        match self.segments.get(name).map(Vec::as_slice) {
            None | Some([]) => Ok(None),
            Some([one]) => Ok(Some(one)),
            Some(_) => Err(refused(format!(
                "the archive holds WAL segment {name} twice, with different contents"
            ))),
        }
    }
}

/// Reads an archived segment whole, its SHA-1 checked.
fn read_segment(s: &ArchivedSegment) -> std::io::Result<Vec<u8>> {
    let file = open_file(&s.repo, &s.file).map_err(|e| std::io::Error::other(e.to_string()))?;
    let mut data = Vec::new();
    s.compression
        .decoder(file, &s.name)?
        .take(MAX_SEGMENT + 1)
        .read_to_end(&mut data)
        .map_err(|e| std::io::Error::other(format!("WAL segment {}: {e}", s.name)))?;
    if data.len() as u64 > MAX_SEGMENT {
        return Err(std::io::Error::other(format!(
            "WAL segment {} is larger than any PostgreSQL writes",
            s.name
        )));
    }
    if <[u8; 20]>::from(Sha1::digest(&data)) != s.sha1 {
        return Err(std::io::Error::other(format!(
            "WAL segment {}: its contents do not match the SHA-1 in its name",
            s.name
        )));
    }
    Ok(data)
}

/// The stanza's backups, oldest first, each with the WAL that follows it
/// up to the next one's (the last: as far as the archive runs on).
fn read_repository(repo: &Path, stanza: &str) -> EngineResult<(u64, Vec<RepoBackup>)> {
    if !valid_stanza(stanza) {
        return Err(refused(format!(
            "{stanza:?} is not a pgBackRest stanza name"
        )));
    }
    let info = read_info(repo, &format!("backup/{stanza}/backup.info"))?;
    if !info.section("cipher").is_empty() {
        return Err(refused(
            "the repository is encrypted (backup.info has a cipher passphrase): encrypted pgBackRest repositories are not supported",
        ));
    }
    let system_id = as_u64(&info, "db-system-id", &info.need("db", "db-system-id")?)?;
    let mut backups = Vec::new();
    for (label, value) in info.section("backup:current") {
        if !valid_label(label) {
            return Err(refused(format!(
                "{}: {label:?} is not a pgBackRest backup label",
                info.name
            )));
        }
        let v = info.json(label, value)?;
        let db_id = v.get("db-id").and_then(Value::as_u64).unwrap_or(0);
        let history = info.get("db:history", &db_id.to_string())?.ok_or_else(|| {
            refused(format!(
                "{}: no database {db_id} in [db:history]",
                info.name
            ))
        })?;
        let version = history
            .get("db-version")
            .and_then(Value::as_str)
            .filter(|v| valid_db_version(v))
            .ok_or_else(|| refused(format!("{}: database {db_id} has no version", info.name)))?
            .to_string();
        backups.push((label.clone(), db_id, version));
    }
    backups.sort();
    let mut read = Vec::new();
    let mut archives: HashMap<String, WalArchive> = HashMap::new();
    for (label, db_id, version) in &backups {
        let mut backup = read_manifest(repo, stanza, label, system_id)?;
        let dir = format!("{version}-{db_id}");
        if !archives.contains_key(&dir) {
            let rel = format!("archive/{stanza}/{dir}");
            archives.insert(dir.clone(), WalArchive::scan(repo, &rel)?);
        }
        backup.segments = match archives.get(&dir) {
            Some(archive) => wal_run(archive, &backup.archive_start)?,
            None => Vec::new(),
        };
        if backup.segments.is_empty() {
            return Err(refused(format!(
                "backup {label} starts in WAL segment {}, which is not in archive/{stanza}/{dir}: without it the backup cannot be restored",
                backup.archive_start
            )));
        }
        read.push(backup);
    }
    // Each backup keeps the WAL up to the next one's start on its timeline.
    let starts: Vec<(TimelineId, String)> = read
        .iter()
        .map(|b| (b.timeline, b.archive_start.clone()))
        .collect();
    for (i, b) in read.iter_mut().enumerate() {
        if let Some((tli, next)) = starts.get(i + 1) {
            if *tli == b.timeline {
                let stop = b
                    .segments
                    .iter()
                    .position(|s| &s.name >= next && s.name > b.archive_stop);
                if let Some(stop) = stop.filter(|s| *s > 0) {
                    b.segments.truncate(stop);
                }
            }
        }
    }
    Ok((system_id, read))
}

/// The segments from `start` on, while they follow each other. Segment
/// names are compared as numbers of a geometry read from the first one.
fn wal_run(archive: &WalArchive, start: &str) -> EngineResult<Vec<ArchivedSegment>> {
    let Some(first) = archive.get(start)? else {
        return Ok(Vec::new());
    };
    let size = read_segment(first)
        .map_err(|e| refused(e.to_string()))?
        .len() as u64;
    let geometry = WalGeometry::new(size)
        .map_err(|e| refused(format!("WAL segment {start}: {size} bytes: {e}")))?;
    let Some((tli, mut seg)) = geometry.parse_segment_file_name(start) else {
        return Err(refused(format!("{start} is not a WAL segment name")));
    };
    let mut run = vec![first.clone()];
    loop {
        seg = pg_wal::SegmentNo(seg.0 + 1);
        match archive.get(&geometry.segment_file_name(tli, seg))? {
            Some(s) => run.push(s.clone()),
            None => return Ok(run),
        }
    }
}

/// An entry of a tar stream being made.
enum Member {
    Dir(String, u32),
    File(BackupFile),
    Segment(ArchivedSegment),
}

/// A backup of the repository as the tar streams pg_basebackup writes.
struct RepoTar(Arc<RepoBackup>);

impl TarSource for RepoTar {
    fn describe(&self) -> String {
        let b = &self.0;
        format!(
            "pgBackRest backup {} ({} backup, {} WAL segments from {})",
            b.label,
            b.kind,
            b.segments.len(),
            b.archive_start
        )
    }

    fn open(&self, archive: &Archive) -> EngineResult<Box<dyn Read + Send>> {
        let b = &self.0;
        let mut members: Vec<(String, Member)> = Vec::new();
        match archive.role {
            Role::Wal => {
                for s in &b.segments {
                    members.push((s.name.clone(), Member::Segment(s.clone())));
                }
            }
            role => {
                let tablespace = match role {
                    Role::Tablespace(oid) => Some(oid),
                    _ => None,
                };
                for d in b.dirs.iter().filter(|d| d.tablespace == tablespace) {
                    members.push((d.path.clone(), Member::Dir(d.path.clone(), d.mode)));
                }
                for f in b.files.iter().filter(|f| f.tablespace == tablespace) {
                    members.push((f.path.clone(), Member::File(f.clone())));
                }
                members.sort_by(|a, b| a.0.cmp(&b.0));
            }
        }
        Ok(Box::new(TarStream {
            backup: b.clone(),
            members: members.into_iter().map(|(_, m)| m).collect(),
            next: 0,
            buf: Vec::new(),
            pos: 0,
            current: None,
            ended: false,
        }))
    }
}

/// A file's contents as they are read, checked against the manifest.
struct Checked {
    input: Box<dyn Read + Send>,
    name: String,
    size: u64,
    read: u64,
    sha1: Option<[u8; 20]>,
    hasher: Sha1,
}

impl Checked {
    fn finish(&mut self) -> std::io::Result<()> {
        if self.read != self.size {
            return Err(std::io::Error::other(format!(
                "{}: {} bytes, the manifest says {}",
                self.name, self.read, self.size
            )));
        }
        let sum: [u8; 20] = std::mem::take(&mut self.hasher).finalize().into();
        if self.sha1.is_some_and(|want| want != sum) {
            return Err(std::io::Error::other(format!(
                "{}: its contents do not match the SHA-1 in the manifest",
                self.name
            )));
        }
        Ok(())
    }
}

/// The tar stream of a backup's files or of its WAL.
struct TarStream {
    backup: Arc<RepoBackup>,
    members: Vec<Member>,
    next: usize,
    /// Bytes ready to hand out: a header, padding, a whole segment.
    buf: Vec<u8>,
    pos: usize,
    current: Option<Checked>,
    ended: bool,
}

fn header(
    path: &str,
    kind: tar::EntryType,
    size: u64,
    mode: u32,
    mtime: u64,
) -> std::io::Result<Vec<u8>> {
    let mut h = tar::Header::new_ustar();
    h.set_path(path)
        .map_err(|e| std::io::Error::other(format!("{path}: {e}")))?;
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(mode);
    h.set_mtime(mtime);
    h.set_cksum();
    Ok(h.as_bytes().to_vec())
}

fn padding(size: u64) -> Vec<u8> {
    vec![0u8; (size.div_ceil(512) * 512 - size) as usize]
}

impl TarStream {
    /// Queues the next member; false when there is none.
    fn advance(&mut self) -> std::io::Result<bool> {
        let Some(member) = self.members.get(self.next) else {
            return Ok(false);
        };
        self.next += 1;
        self.pos = 0;
        match member {
            Member::Dir(path, mode) => {
                self.buf = header(path, tar::EntryType::Directory, 0, *mode, 0)?;
            }
            Member::Segment(s) => {
                let data = read_segment(s)?;
                let size = data.len() as u64;
                self.buf = header(&s.name, tar::EntryType::Regular, size, 0o600, 0)?;
                self.buf.extend_from_slice(&data);
                self.buf.extend_from_slice(&padding(size));
            }
            Member::File(f) => {
                self.buf = header(&f.path, tar::EntryType::Regular, f.size, f.mode, f.mtime)?;
                if f.size > 0 {
                    let b = &self.backup;
                    let root = match f.tablespace {
                        Some(oid) => format!("pg_tblspc/{oid}"),
                        None => "pg_data".into(),
                    };
                    let stored = format!("{root}/{}{}", f.path, b.compression.extension());
                    let name = format!("{}/{stored}", f.stored_in);
                    let rel = format!("backup/{}/{name}", b.stanza);
                    let file = open_file(&b.repo, &rel)
                        .map_err(|e| std::io::Error::other(e.to_string()))?;
                    self.current = Some(Checked {
                        input: b.compression.decoder(file, &name)?,
                        name,
                        size: f.size,
                        read: 0,
                        sha1: f.sha1,
                        hasher: Sha1::new(),
                    });
                }
            }
        }
        Ok(true)
    }
}

impl Read for TarStream {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        loop {
            if self.pos < self.buf.len() {
                let n = out.len().min(self.buf.len() - self.pos);
                out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
                self.pos += n;
                return Ok(n);
            }
            if let Some(cur) = self.current.as_mut() {
                let room = (cur.size - cur.read).min(out.len() as u64) as usize;
                // One byte past the stated size is read to find a longer file.
                let mut probe = [0u8; 1];
                let n = if room == 0 {
                    cur.input.read(&mut probe)?
                } else {
                    cur.input.read(&mut out[..room])?
                };
                if n > 0 && room == 0 {
                    return Err(std::io::Error::other(format!(
                        "{}: longer than the manifest says ({} bytes)",
                        cur.name, cur.size
                    )));
                }
                if n > 0 {
                    cur.hasher.update(&out[..n]);
                    cur.read += n as u64;
                    return Ok(n);
                }
                cur.finish()?;
                self.buf = padding(cur.size);
                self.pos = 0;
                self.current = None;
                continue;
            }
            if self.advance()? {
                continue;
            }
            if self.ended {
                return Ok(0);
            }
            self.ended = true;
            self.buf = vec![0u8; 1024];
            self.pos = 0;
        }
    }
}

impl Engine {
    /// Imports every backup of pgBackRest stanza `stanza` in the
    /// repository at `repo` as a backup set of `instance_id`, oldest
    /// first, with the archived WAL from each on. Every backup is checked
    /// (read whole, SHA-1s compared) before anything is stored; a refusal
    /// records nothing.
    pub async fn import_pgbackrest(
        &self,
        instance_id: &str,
        repo: &Path,
        stanza: &str,
        progress: &dyn Progress,
    ) -> EngineResult<Vec<BackupSet>> {
        let instance = self.catalog.get_instance(instance_id)?;
        let (path, name) = (repo.to_path_buf(), stanza.to_string());
        let (system_id, backups) = blocking(move || read_repository(&path, &name)).await?;
        if let Some(known) = instance.system_identifier.filter(|k| *k != system_id) {
            return Err(refused(format!(
                "stanza {stanza} is the cluster with system identifier {system_id}, but instance {instance_id} is the cluster {known}: refusing to mix them"
            )));
        }
        if backups.is_empty() {
            return Err(refused(format!("stanza {stanza} has no backups")));
        }
        progress.message(&format!(
            "pgBackRest stanza {stanza}: {} backups ({})",
            backups.len(),
            backups
                .iter()
                .map(|b| format!("{} {}", b.label, b.kind))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        let mut checked = Vec::new();
        for backup in backups {
            let backup = Arc::new(backup);
            let size = |t: Option<u32>| -> u64 {
                let files = backup.files.iter().filter(|f| f.tablespace == t);
                files.map(|f| f.size + 512).sum()
            };
            // The order pg_basebackup writes: tablespaces, data directory, WAL.
            let mut archives: Vec<Archive> = backup
                .tablespaces
                .iter()
                .map(|oid| {
                    Archive::synthesized(
                        format!("{}/pg_tblspc/{oid}", backup.label),
                        Role::Tablespace(*oid),
                        size(Some(*oid)),
                    )
                })
                .collect();
            archives.push(Archive::synthesized(
                format!("{}/pg_data", backup.label),
                Role::Base,
                size(None),
            ));
            archives.push(Archive::synthesized(
                format!("WAL from {}", backup.archive_start),
                Role::Wal,
                backup.segments.len() as u64 * (16 << 20),
            ));
            let import = ImportDir::synthesized(
                Arc::new(RepoTar(backup.clone())),
                archives,
                (backup.start, backup.stop),
                true,
                backup.ended_at,
            );
            progress.message(&format!("checking backup {}", backup.label));
            let c = self
                .check_import(&instance, import, progress)
                .await
                .map_err(|e| match e {
                    EngineError::Refused(msg) => refused(format!("backup {}: {msg}", backup.label)),
                    other => other,
                })?;
            checked.push((backup.label.clone(), c));
        }
        let mut sets = Vec::new();
        for (label, c) in checked {
            let (start, stop) = c.range();
            progress.message(&format!(
                "importing backup {label}: WAL from {start}, backup ends at {stop}"
            ));
            let pending = self.record_import(instance_id, c)?;
            sets.push(self.run_import(pending, progress).await?);
        }
        Ok(sets)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_and_stanzas_are_checked() {
        assert!(valid_label("20261206-195010F"));
        assert!(valid_label("20261206-195010F_20261206-195015D"));
        assert!(valid_label("20261206-195010F_20261206-195015I"));
        for bad in [
            "../20261206-195010F",
            "20261206-195010D",
            "20261206-195010F_../../../etc",
            "2026120a-195010F",
            "",
        ] {
            assert!(!valid_label(bad), "{bad}");
        }
        assert!(valid_stanza("main") && valid_stanza("db-1.prod"));
        for bad in ["..", ".", "a/b", "", "x y"] {
            assert!(!valid_stanza(bad), "{bad}");
        }
    }

    #[test]
    fn manifest_names_stay_in_the_data_directory() {
        let ini = Ini::parse("m", b"[x]\n").unwrap();
        let ts = [16384];
        assert_eq!(
            data_path(&ini, "pg_data/base/1/1259", FileKind::File, &ts).unwrap(),
            (None, "base/1/1259".to_string())
        );
        assert_eq!(
            data_path(&ini, "pg_tblspc/16384/PG_15_1/5/1", FileKind::File, &ts).unwrap(),
            (Some(16384), "PG_15_1/5/1".to_string())
        );
        for bad in [
            "pg_data/../../etc/passwd",
            "pg_data//etc",
            "pg_tblspc/16385/x",
            "pg_tblspc/16384/../../x",
            "/etc/passwd",
            "pg_data/base/../../x",
        ] {
            assert!(data_path(&ini, bad, FileKind::File, &ts).is_err(), "{bad}");
        }
    }

    #[test]
    fn only_tablespace_links_are_imported() {
        let manifest = |target: &str, link: &str| {
            format!(
                "[backup:target]\npg_data={{\"path\":\"/d\",\"type\":\"path\"}}\n{target}\n\n[target:link]\n{link}\n"
            )
        };
        let ts = "pg_tblspc/16384={\"path\":\"/t\",\"tablespace-id\":\"16384\",\"tablespace-name\":\"spare\",\"type\":\"link\"}";
        let ini = Ini::parse(
            "m",
            manifest(ts, "pg_data/pg_tblspc/16384={\"destination\":\"/t\"}").as_bytes(),
        )
        .unwrap();
        assert_eq!(tablespaces(&ini, "L").unwrap(), vec![16384]);
        for (target, link) in [
            (
                "pg_data/pg_wal={\"path\":\"/w\",\"type\":\"link\"}",
                "pg_data/pg_wal={\"destination\":\"/w\"}",
            ),
            (ts, "pg_data/pg_tblspc/16385={\"destination\":\"/x\"}"),
            (
                "pg_tblspc/../x={\"path\":\"/t\",\"tablespace-id\":\"16384\",\"type\":\"link\"}",
                "",
            ),
        ] {
            let ini = Ini::parse("m", manifest(target, link).as_bytes()).unwrap();
            let err = tablespaces(&ini, "L").unwrap_err();
            assert!(err.to_string().contains("tablespaces only"), "{err}");
        }
    }

    #[test]
    fn ini_values_are_json() {
        let ini = Ini::parse(
            "backup.info",
            b"[db]\ndb-system-id=7716280716970049276\ndb-version=\"15\"\n\n[x]\n",
        )
        .unwrap();
        assert_eq!(
            ini.need("db", "db-system-id").unwrap().as_u64(),
            Some(7716280716970049276)
        );
        assert!(ini.need("db", "missing").is_err());
        assert!(Ini::parse("b", b"key=outside\n").is_err());
        assert!(Ini::parse("b", &[0xff, 0xfe])
            .unwrap_err()
            .to_string()
            .contains("encrypted"));
    }

    #[test]
    fn encrypted_and_unreadable_repositories_are_refused() {
        let repo = tempfile::tempdir().unwrap();
        let stanza = repo.path().join("backup/main");
        std::fs::create_dir_all(&stanza).unwrap();
        std::fs::write(
            stanza.join("backup.info"),
            "[cipher]\ncipher-pass=\"secret\"\n\n[db]\ndb-system-id=1\n",
        )
        .unwrap();
        let err = read_repository(repo.path(), "main").unwrap_err();
        assert!(err.to_string().contains("encrypted"), "{err}");
        let err = read_repository(repo.path(), "../main").unwrap_err();
        assert!(err.to_string().contains("not a pgBackRest stanza"), "{err}");
        for kind in ["lz4", "bz2"] {
            let err = Compression::from_type(kind).unwrap_err();
            assert!(err.to_string().contains("gz, zst"), "{err}");
        }
    }

    #[test]
    fn a_file_that_differs_from_the_manifest_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let label = "20261206-195010F";
        let data = dir.path().join("backup/main").join(label).join("pg_data");
        std::fs::create_dir_all(&data).unwrap();
        std::fs::write(data.join("PG_VERSION"), b"15\n").unwrap();
        let file = |size, sum: &[u8]| BackupFile {
            tablespace: None,
            path: "PG_VERSION".into(),
            stored_in: label.into(),
            size,
            sha1: Some(Sha1::digest(sum).into()),
            mode: 0o600,
            mtime: 0,
        };
        let stream = |f: BackupFile| {
            let backup = Arc::new(RepoBackup {
                label: label.into(),
                kind: "full".into(),
                repo: dir.path().to_path_buf(),
                stanza: "main".into(),
                compression: Compression::None,
                start: Lsn(0),
                stop: Lsn(0),
                archive_start: String::new(),
                archive_stop: String::new(),
                timeline: TimelineId(1),
                ended_at: None,
                tablespaces: Vec::new(),
                dirs: Vec::new(),
                files: vec![f],
                segments: Vec::new(),
            });
            let archive = Archive::synthesized("x".into(), Role::Base, 0);
            let mut out = Vec::new();
            RepoTar(backup)
                .open(&archive)
                .unwrap()
                .read_to_end(&mut out)
                .map(|_| out)
        };
        let tar = stream(file(3, b"15\n")).unwrap();
        assert_eq!(tar.len(), 512 * 2 + 1024);
        assert_eq!(&tar[512..515], b"15\n");
        let err = stream(file(3, b"14\n")).unwrap_err();
        assert!(err.to_string().contains("SHA-1"), "{err}");
        let err = stream(file(2, b"15")).unwrap_err();
        assert!(err.to_string().contains("longer"), "{err}");
        let err = stream(file(4, b"15\n\n")).unwrap_err();
        assert!(err.to_string().contains("the manifest says 4"), "{err}");
    }

    /// A repository whose `backup.info` is `info` (after a valid `[db]`).
    fn repo_with_info(info: &str) -> tempfile::TempDir {
        let repo = tempfile::tempdir().unwrap();
        let stanza = repo.path().join("backup/main");
        std::fs::create_dir_all(&stanza).unwrap();
        std::fs::write(
            stanza.join("backup.info"),
            format!("[db]\ndb-system-id=7\n\n[db:history]\n1={{\"db-version\":\"15\"}}\n\n{info}"),
        )
        .unwrap();
        repo
    }

    #[test]
    fn hostile_labels_stanzas_and_versions_from_a_repository_are_refused() {
        let long = "2".repeat(4096);
        for label in [
            "../20261206-195010F",
            "20261206-195010F/../../etc",
            "20261206-195010F\"",
            "20261206-195010F';touch /tmp/x'",
            "\"20261206-195010F\"",
            "20261206-195010F\u{0}",
            "20261206-195010F\\n",
            long.as_str(),
        ] {
            let repo = repo_with_info(&format!("[backup:current]\n{label}={{\"db-id\":1}}\n"));
            let err = read_repository(repo.path(), "main").unwrap_err();
            assert!(
                err.to_string().contains("not a pgBackRest backup label"),
                "{label:?}: {err}"
            );
        }
        // A version names a directory: only digits and one dot.
        for version in ["..", "../../etc", "15/..", "15\\n", "1.2.3", "", "99999999"] {
            let repo = tempfile::tempdir().unwrap();
            let stanza = repo.path().join("backup/main");
            std::fs::create_dir_all(&stanza).unwrap();
            std::fs::write(
                stanza.join("backup.info"),
                format!("[db]\ndb-system-id=7\n\n[db:history]\n1={{\"db-version\":\"{version}\"}}\n\n[backup:current]\n20261206-195010F={{\"db-id\":1}}\n"),
            )
            .unwrap();
            let err = read_repository(repo.path(), "main").unwrap_err();
            assert!(
                err.to_string().contains("has no version"),
                "{version:?}: {err}"
            );
        }
        for stanza in [
            "..",
            "../main",
            "a/b",
            "main\n",
            "ma'in",
            "ma\"in",
            "$(id)",
            &"s".repeat(300),
        ] {
            let err = read_repository(Path::new("/nonexistent"), stanza).unwrap_err();
            assert!(
                err.to_string().contains("not a pgBackRest stanza"),
                "{stanza:?}: {err}"
            );
        }
        assert!(valid_db_version("15") && valid_db_version("9.6"));
    }

    #[test]
    fn links_in_a_repository_are_not_followed() {
        // A label directory that is a link elsewhere: its manifest is not read.
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("backup.manifest"), "[backup]\n").unwrap();
        let repo = repo_with_info("[backup:current]\n20261206-195010F={\"db-id\":1}\n");
        std::os::unix::fs::symlink(
            outside.path(),
            repo.path().join("backup/main/20261206-195010F"),
        )
        .unwrap();
        let err = read_repository(repo.path(), "main").unwrap_err();
        assert!(err.to_string().contains("cannot open"), "{err}");
        // The stanza's directory as a link: refused alike.
        let other = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(other.path().join("backup")).unwrap();
        std::os::unix::fs::symlink(
            repo.path().join("backup/main"),
            other.path().join("backup/main"),
        )
        .unwrap();
        let err = read_repository(other.path(), "main").unwrap_err();
        assert!(err.to_string().contains("cannot open"), "{err}");
        // A data file reached through a linked directory.
        let dir = tempfile::tempdir().unwrap();
        let label = "20261206-195010F";
        std::fs::create_dir_all(dir.path().join("backup/main").join(label)).unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        std::fs::write(elsewhere.path().join("PG_VERSION"), b"15\n").unwrap();
        std::os::unix::fs::symlink(
            elsewhere.path(),
            dir.path().join("backup/main").join(label).join("pg_data"),
        )
        .unwrap();
        let err = open_file(
            dir.path(),
            &format!("backup/main/{label}/pg_data/PG_VERSION"),
        )
        .unwrap_err();
        assert!(err.to_string().contains("cannot open"), "{err}");
        // A WAL segment that is a link.
        let wal = dir.path().join("archive/main/15-1/0000000100000000");
        std::fs::create_dir_all(&wal).unwrap();
        let name = format!("000000010000000000000002-{}", "0".repeat(40));
        std::os::unix::fs::symlink("/etc/passwd", wal.join(&name)).unwrap();
        let archive = WalArchive::scan(dir.path(), "archive/main/15-1").unwrap();
        let segment = archive.get("000000010000000000000002").unwrap().unwrap();
        let err = read_segment(segment).unwrap_err();
        assert!(err.to_string().contains("cannot open"), "{err}");
    }
}
