//! The configuration files of a PostgreSQL data directory that came from another server, made
//! safe to start: every setting that runs a command, loads code, names a file or directory,
//! opens a listener or points recovery or replication somewhere is commented out
//! ([`is_neutralized`]), and `pg_hba.conf`/`pg_ident.conf` lines that read other files are
//! dropped. Both the Strata server (restored copies it starts on its own host) and the agent
//! (clones it starts on the database host) go through [`neutralize_copy`], so a copy never
//! inherits the source's `archive_command`, `restore_command`, `ssl_passphrase_command`,
//! `shared_preload_libraries` or anything else that runs a program.
//!
//! Files are opened beneath one directory handle ([`ConfDir`]) without following symlinks, so
//! a configuration file replaced by a symlink is refused instead of read or written through.
//!
//! Reference: PostgreSQL's src/backend/utils/misc/guc-file.l (configuration file syntax),
//! guc_tables.c (the settings and what they do) and src/backend/libpq/hba.c (`include*`
//! directives and `@file` lists).
#![warn(missing_docs)]

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// Whether a setting from a source's configuration file is removed before a copy starts: it
/// runs a command, loads code, names a file or directory (which may lie outside the data
/// directory), opens a listener, points recovery or replication somewhere, or belongs to an
/// extension. The caller sets its own values for the listener and recovery afterwards.
pub fn is_neutralized(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    const SUFFIXES: [&str; 9] = [
        "_command",
        "_library",
        "_libraries",
        "_path",
        "file",
        "_dir",
        "_directory",
        "_directories",
        "_provider",
    ];
    const PREFIXES: [&str; 7] = [
        "include",
        "archive_",
        "primary_",
        "recovery_",
        "restore_",
        "unix_socket_",
        "ssl",
    ];
    const EXACT: [&str; 8] = [
        "listen_addresses",
        "port",
        "log_filename",
        "hot_standby",
        "data_directory",
        "event_source",
        "krb_server_keyfile",
        "synchronized_standby_slots",
    ];
    // Settings of extensions (dotted names): their libraries are not
    // preloaded any more, and some run code when loaded (`plperl.on_init`,
    // `pltcl.start_proc`).
    name.contains('.')
        || SUFFIXES.iter().any(|s| name.ends_with(s))
        || PREFIXES.iter().any(|p| name.starts_with(p))
        || EXACT.contains(&name.as_str())
}

/// The setting (or directive) a configuration line sets, lowercased, as
/// PostgreSQL's lexer reads it: optional blanks, then a name made of
/// letters, digits, `_`, `.` and bytes ≥ 0x80. `None` for blank and
/// comment lines. Lines are bytes: PostgreSQL reads files in any encoding,
/// so a line that is not UTF-8 is still a line.
pub fn line_setting(line: &[u8]) -> Option<String> {
    let start = line
        .iter()
        .position(|b| !matches!(b, b' ' | b'\t' | b'\r' | b'\x0c' | b'\x0b'))?;
    let t = &line[start..];
    let end = t
        .iter()
        .position(|&b| !(b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b >= 0x80))
        .unwrap_or(t.len());
    (end > 0).then(|| String::from_utf8_lossy(&t[..end]).to_ascii_lowercase())
}

/// The value of a `name = value` line, unquoted; `None` if it is not a
/// plain value.
pub fn line_value<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let t = line.trim_start();
    let rest = t.get(name.len()..)?.trim_start();
    let rest = rest.strip_prefix('=').unwrap_or(rest).trim();
    let value = rest.split('#').next()?.trim();
    Some(value.trim_matches('\''))
}

/// Largest configuration file read: a planted multi-gigabyte "postgresql.conf" is refused, not
/// loaded into memory.
pub const MAX_CONF_FILE: u64 = 16 * 1024 * 1024;

/// What a commented-out line starts with.
pub const NEUTRALIZED: &[u8] = b"# neutralized by strata: ";

/// Comments out every neutralized setting of one configuration file;
/// returns the new text and the names removed.
pub fn neutralize_text(text: &[u8]) -> (Vec<u8>, Vec<String>) {
    let mut out = Vec::with_capacity(text.len());
    let mut removed = Vec::new();
    for line in text.split_inclusive(|&b| b == b'\n') {
        match line_setting(line) {
            Some(name) if is_neutralized(&name) => {
                out.extend_from_slice(NEUTRALIZED);
                out.extend(line.iter().filter(|&&b| b != b'\r'));
                if !line.ends_with(b"\n") {
                    out.push(b'\n');
                }
                removed.push(name);
            }
            _ => out.extend_from_slice(line),
        }
    }
    (out, removed)
}

/// Lines of `pg_hba.conf`/`pg_ident.conf` that read other files
/// (`include*` directives, `@file` lists) are dropped from a copy. A line
/// ending in a backslash continues on the next (PostgreSQL 16+), so the
/// decision is taken for whole logical lines. Returns the new text and
/// whether anything was dropped.
pub fn neutralize_hba(text: &[u8]) -> (Vec<u8>, bool) {
    let mut dropped = false;
    let mut out = Vec::with_capacity(text.len());
    let lines: Vec<&[u8]> = text.split(|&b| b == b'\n').collect();
    let mut i = 0;
    while i < lines.len() {
        let mut j = i;
        while j + 1 < lines.len() && trim_end(lines[j]).ends_with(b"\\") {
            j += 1;
        }
        // PostgreSQL drops the backslash and the line break and reads on.
        let logical: Vec<u8> = lines[i..=j]
            .iter()
            .enumerate()
            .flat_map(|(k, l)| {
                let l = if i + k < j {
                    let t = trim_end(l);
                    &t[..t.len() - 1]
                } else {
                    l
                };
                l.iter().copied()
            })
            .collect();
        let t = trim_start(&logical);
        let reads_files = !t.starts_with(b"#")
            && (t.to_ascii_lowercase().starts_with(b"include") || t.contains(&b'@'));
        for line in &lines[i..=j] {
            if reads_files {
                dropped = true;
                out.extend_from_slice(NEUTRALIZED);
            }
            out.extend_from_slice(line);
            out.push(b'\n');
        }
        i = j + 1;
    }
    // One line break was added per piece, one more than the text has.
    out.pop();
    (out, dropped)
}

fn trim_start(b: &[u8]) -> &[u8] {
    let n = b.iter().take_while(|c| c.is_ascii_whitespace()).count();
    &b[n..]
}

fn trim_end(b: &[u8]) -> &[u8] {
    let n = b
        .iter()
        .rev()
        .take_while(|c| c.is_ascii_whitespace())
        .count();
    &b[..b.len() - n]
}

/// A configuration-file string literal: quotes doubled, backslashes and
/// control characters escaped (guc-file.l's GUC_scanstr reads them back), so
/// a value can never end its line or the string early.
pub fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for c in s.chars() {
        match c {
            '\'' => out.push_str("''"),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 || c == '\x7f' => out.push_str(&format!("\\{:03o}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

/// A configuration file could not be read or written.
#[derive(Debug, thiserror::Error)]
#[error("{op} {}: {source}", path.display())]
pub struct ConfError {
    /// What was attempted.
    pub op: &'static str,
    /// The file.
    pub path: PathBuf,
    /// The operating system's error (`ELOOP` for a symlink).
    #[source]
    pub source: io::Error,
}

/// A data directory whose configuration files are read and written by name, beneath an open
/// handle of the directory and never through a symlink. Files it creates get mode 0600 and,
/// when an owner is given, that owner (a service running as root writes for the PostgreSQL OS
/// user).
#[derive(Debug)]
pub struct ConfDir {
    dir: File,
    shown: PathBuf,
    owner: Option<(u32, u32)>,
}

impl ConfDir {
    /// Opens directory `path` (a symlink to it is followed: the caller chose the path).
    pub fn open(path: &Path) -> Result<ConfDir, ConfError> {
        let dir = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
            .open(path)
            .map_err(|source| ConfError {
                op: "open directory",
                path: path.to_path_buf(),
                source,
            })?;
        Ok(ConfDir::from_dir(dir, path))
    }

    /// Uses an already opened directory; `shown` names it in messages.
    pub fn from_dir(dir: File, shown: &Path) -> ConfDir {
        ConfDir {
            dir,
            shown: shown.to_path_buf(),
            owner: None,
        }
    }

    /// The same directory, giving the files it writes to `uid`/`gid`.
    pub fn with_owner(mut self, uid: u32, gid: u32) -> ConfDir {
        self.owner = Some((uid, gid));
        self
    }

    /// The path of `name` through the open handle: `/proc/self/fd/N/name` resolves to the
    /// directory that was opened, whatever has been renamed or replaced since.
    fn through_handle(&self, name: &str) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.dir.as_raw_fd())).join(name)
    }

    fn err(&self, op: &'static str, name: &str) -> impl FnOnce(io::Error) -> ConfError {
        let path = self.shown.join(name);
        move |source| ConfError { op, path, source }
    }

    /// Whether `name` exists (as anything, a symlink included).
    pub fn exists(&self, name: &str) -> bool {
        std::fs::symlink_metadata(self.through_handle(name)).is_ok()
    }

    /// The bytes of file `name` (at most [`MAX_CONF_FILE`]); `None` when it does not exist. A symlink or any other failure
    /// is an error: a file left unread would be left unfiltered.
    pub fn read(&self, name: &str) -> Result<Option<Vec<u8>>, ConfError> {
        let opened = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open(self.through_handle(name));
        let mut file = match opened {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.err("reading", name)(e)),
        };
        let meta = file.metadata().map_err(self.err("reading", name))?;
        if !meta.is_file() {
            return Err(self.err("reading", name)(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file",
            )));
        }
        let mut bytes = Vec::new();
        (&mut file)
            .take(MAX_CONF_FILE + 1)
            .read_to_end(&mut bytes)
            .map_err(self.err("reading", name))?;
        if bytes.len() as u64 > MAX_CONF_FILE {
            return Err(self.err("reading", name)(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("over {MAX_CONF_FILE} bytes, more than any configuration file holds"),
            )));
        }
        Ok(Some(bytes))
    }

    fn open_for_write(&self, name: &str, append: bool) -> Result<File, ConfError> {
        let mut opts = OpenOptions::new();
        opts.write(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK);
        if append {
            opts.append(true);
        } else {
            opts.truncate(true);
        }
        let file = opts
            .open(self.through_handle(name))
            .map_err(self.err("writing", name))?;
        let meta = file.metadata().map_err(self.err("writing", name))?;
        if !meta.is_file() {
            return Err(self.err("writing", name)(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file",
            )));
        }
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(self.err("setting mode of", name))?;
        if let Some((uid, gid)) = self.owner {
            std::os::unix::fs::fchown(&file, Some(uid), Some(gid))
                .map_err(self.err("setting owner of", name))?;
        }
        Ok(file)
    }

    /// Replaces the contents of file `name` (created when missing), mode 0600.
    pub fn write(&self, name: &str, text: impl AsRef<[u8]>) -> Result<(), ConfError> {
        self.open_for_write(name, false)?
            .write_all(text.as_ref())
            .map_err(self.err("writing", name))
    }

    /// Appends `text` to file `name` (created when missing), mode 0600.
    pub fn append(&self, name: &str, text: impl AsRef<[u8]>) -> Result<(), ConfError> {
        self.open_for_write(name, true)?
            .write_all(text.as_ref())
            .map_err(self.err("writing", name))
    }

    /// Removes `name` if it exists (a symlink itself, never what it points to).
    pub fn remove(&self, name: &str) -> Result<(), ConfError> {
        match std::fs::remove_file(self.through_handle(name)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.err("removing", name)(e)),
        }
    }
}

/// Neutralizes the configuration files of a copied data directory in place (see the crate
/// documentation) and returns what was removed: setting names, and a line per `pg_hba.conf`/
/// `pg_ident.conf` that lost `include`/`@file` lines. A missing `postgresql.conf` (clusters laid
/// out the Debian way keep theirs elsewhere) is created empty and a missing `pg_hba.conf` gets
/// local peer and loopback password authentication. The caller appends its own listener and
/// recovery settings to `postgresql.auto.conf` afterwards (and `ssl = off` when an `ssl*`
/// setting was removed, since certificates named outside the directory are gone).
pub fn neutralize_copy(dir: &ConfDir) -> Result<Vec<String>, ConfError> {
    let mut removed = Vec::new();
    for name in ["postgresql.conf", "postgresql.auto.conf"] {
        let Some(text) = dir.read(name)? else {
            continue;
        };
        let (text, mut gone) = neutralize_text(&text);
        removed.append(&mut gone);
        dir.write(name, &text)?;
    }
    if !dir.exists("postgresql.conf") {
        dir.write("postgresql.conf", "")?;
    }
    for name in ["pg_hba.conf", "pg_ident.conf"] {
        let Some(text) = dir.read(name)? else {
            continue;
        };
        let (text, dropped) = neutralize_hba(&text);
        if dropped {
            removed.push(format!("{name}: include and @file lines"));
        }
        dir.write(name, &text)?;
    }
    if !dir.exists("pg_hba.conf") {
        dir.write(
            "pg_hba.conf",
            "local all all peer\nhost all all 127.0.0.1/32 scram-sha-256\n",
        )?;
    }
    removed.sort();
    removed.dedup();
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_configuration_file_over_the_cap_is_refused_unread() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = ConfDir::open(tmp.path()).unwrap();
        std::fs::write(tmp.path().join("postgresql.conf"), "port = 5433\n").unwrap();
        assert_eq!(
            dir.read("postgresql.conf").unwrap().as_deref(),
            Some(&b"port = 5433\n"[..])
        );
        // Sparse: as large as claimed without taking the space.
        let big = std::fs::File::create(tmp.path().join("postgresql.auto.conf")).unwrap();
        big.set_len(MAX_CONF_FILE + 1).unwrap();
        let err = dir.read("postgresql.auto.conf").unwrap_err();
        assert!(
            err.to_string()
                .contains("more than any configuration file holds"),
            "{err}"
        );
    }

    #[test]
    fn a_copy_is_neutralized_in_place_and_symlinks_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        std::fs::write(
            d.join("postgresql.conf"),
            "shared_buffers = 1MB\narchive_command = 'touch /tmp/x'\n",
        )
        .unwrap();
        std::fs::write(
            d.join("postgresql.auto.conf"),
            "ssl_passphrase_command = 'id'\n",
        )
        .unwrap();
        let dir = ConfDir::open(d).unwrap();
        let removed = neutralize_copy(&dir).unwrap();
        assert_eq!(removed, ["archive_command", "ssl_passphrase_command"]);
        assert_eq!(
            std::fs::read_to_string(d.join("postgresql.conf")).unwrap(),
            "shared_buffers = 1MB\n# neutralized by strata: archive_command = 'touch /tmp/x'\n"
        );
        assert!(std::fs::read_to_string(d.join("pg_hba.conf"))
            .unwrap()
            .starts_with("local all all peer\n"));
        let mode = std::fs::metadata(d.join("pg_hba.conf"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);

        // A configuration file replaced by a symlink is neither read nor written through.
        let outside = tmp.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("target"), "archive_command = 'x'\n").unwrap();
        std::fs::remove_file(d.join("postgresql.auto.conf")).unwrap();
        std::os::unix::fs::symlink(outside.join("target"), d.join("postgresql.auto.conf")).unwrap();
        let err = neutralize_copy(&dir).unwrap_err();
        assert_eq!(err.source.raw_os_error(), Some(libc::ELOOP), "{err}");
        assert!(dir.append("postgresql.auto.conf", "port = 1\n").is_err());
        assert_eq!(
            std::fs::read_to_string(outside.join("target")).unwrap(),
            "archive_command = 'x'\n"
        );
        dir.remove("postgresql.auto.conf").unwrap();
        assert!(outside.join("target").exists());
    }
}
