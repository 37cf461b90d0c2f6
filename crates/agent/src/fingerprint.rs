//! A snapshot's fingerprint: SHA-256 over every entry's path, kind, size, inode and change
//! time, taken when the snapshot is complete and compared before the snapshot is used.
//!
//! The snapshot's files belong to the PostgreSQL OS user, who (or a SQL superuser through
//! `COPY ... TO PROGRAM`) can rewrite them. Such a change cannot hide from the kernel's change
//! time (`st_ctime`, set on every write, truncate, chmod, rename or link; only root can set it
//! back), so a changed snapshot has a different fingerprint. The fingerprint also records the
//! latest change time it saw, so a mismatch can name a file changed after it.
//!
//! Text form: `v1:<seconds>.<nanoseconds>:<sha256 hex>`.

use std::fmt;

use sha2::{Digest, Sha256};

use crate::snapshot::{EntryKind, FileStamp, Manifest, ManifestEntry};

/// A snapshot's fingerprint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprint {
    /// Latest change time of any entry: (seconds, nanoseconds).
    latest: (i64, i64),
    /// SHA-256 of the sorted entry list.
    digest: [u8; 32],
}

/// Why a fingerprint could not be taken or read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FingerprintError {
    /// The manifest has an entry without inode and change time (an older agent).
    #[error("the agent's manifest has no inode and change time for {0} (agent too old)")]
    NoStamp(String),
    /// The stored text is not a fingerprint.
    #[error("not a snapshot fingerprint: {0:?}")]
    Malformed(String),
}

impl Fingerprint {
    /// Takes the fingerprint of a snapshot from its manifest (as `GET manifest` serves it).
    pub fn of(manifest: &Manifest) -> Result<Fingerprint, FingerprintError> {
        let mut entries: Vec<(&ManifestEntry, FileStamp)> = Vec::new();
        for e in &manifest.entries {
            let stamp = e
                .stamp
                .ok_or_else(|| FingerprintError::NoStamp(e.path.to_string()))?;
            entries.push((e, stamp));
        }
        entries.sort_by(|a, b| a.0.path.as_str().cmp(b.0.path.as_str()));
        let mut hash = Sha256::new();
        let mut latest = (i64::MIN, 0);
        for (e, s) in &entries {
            // Length-prefixed path so no two lists hash the same bytes.
            let path = e.path.as_str().as_bytes();
            hash.update((path.len() as u64).to_le_bytes());
            hash.update(path);
            hash.update([match e.kind {
                EntryKind::File => b'f',
                EntryKind::Dir => b'd',
            }]);
            hash.update(e.size.to_le_bytes());
            hash.update(s.inode.to_le_bytes());
            hash.update(s.ctime_sec.to_le_bytes());
            hash.update(s.ctime_nsec.to_le_bytes());
            latest = latest.max((s.ctime_sec, s.ctime_nsec));
        }
        Ok(Fingerprint {
            latest,
            digest: hash.finalize().into(),
        })
    }

    /// Reads the text form.
    pub fn parse(text: &str) -> Result<Fingerprint, FingerprintError> {
        let bad = || FingerprintError::Malformed(text.chars().take(100).collect());
        let rest = text.strip_prefix("v1:").ok_or_else(bad)?;
        let (time, digest) = rest.split_once(':').ok_or_else(bad)?;
        let (sec, nsec) = time.split_once('.').ok_or_else(bad)?;
        let latest = (
            sec.parse().map_err(|_| bad())?,
            nsec.parse().map_err(|_| bad())?,
        );
        let digest = hex::decode(digest)
            .ok()
            .and_then(|d| <[u8; 32]>::try_from(d).ok())
            .ok_or_else(bad)?;
        Ok(Fingerprint { latest, digest })
    }

    /// Compares with the snapshot as `manifest` shows it now: `None` if unchanged, else what
    /// changed, naming the first entry (in path order) changed after this fingerprint was taken.
    pub fn check(&self, manifest: &Manifest) -> Result<Option<String>, FingerprintError> {
        let now = Fingerprint::of(manifest)?;
        if now.digest == self.digest {
            return Ok(None);
        }
        let mut entries: Vec<&ManifestEntry> = manifest.entries.iter().collect();
        entries.sort_by(|a, b| a.path.as_str().cmp(b.path.as_str()));
        let changed = entries.into_iter().find(|e| {
            e.stamp
                .is_some_and(|s| (s.ctime_sec, s.ctime_nsec) > self.latest)
        });
        Ok(Some(match changed {
            Some(e) => format!("{}: ctime", e.path),
            None => "the list of files, their sizes or inodes".to_string(),
        }))
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "v1:{}.{}:{}",
            self.latest.0,
            self.latest.1,
            hex::encode(self.digest)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::names::RelPath;

    fn entry(path: &str, kind: EntryKind, size: u64, inode: u64, ctime: i64) -> ManifestEntry {
        ManifestEntry {
            path: RelPath::new(path).unwrap(),
            kind,
            size,
            mode: 0o600,
            stamp: Some(FileStamp {
                inode,
                ctime_sec: ctime,
                ctime_nsec: 5,
            }),
        }
    }

    fn sample() -> Manifest {
        Manifest {
            entries: vec![
                entry("base", EntryKind::Dir, 0, 10, 100),
                entry("base/1", EntryKind::Dir, 0, 11, 100),
                entry("base/1/1234", EntryKind::File, 8192, 12, 100),
                entry("global/pg_control", EntryKind::File, 8192, 13, 101),
            ],
        }
    }

    #[test]
    fn unchanged_snapshot_matches_whatever_the_entry_order() {
        let taken = Fingerprint::of(&sample()).unwrap();
        let text = taken.to_string();
        assert!(text.starts_with("v1:101.5:"), "{text}");
        let read = Fingerprint::parse(&text).unwrap();
        assert_eq!(read, taken);
        let mut reordered = sample();
        reordered.entries.reverse();
        assert_eq!(read.check(&reordered).unwrap(), None);
    }

    #[test]
    fn a_changed_file_is_named() {
        let taken = Fingerprint::of(&sample()).unwrap();
        let mut m = sample();
        m.entries[2].stamp = Some(FileStamp {
            inode: 12,
            ctime_sec: 200,
            ctime_nsec: 0,
        });
        assert_eq!(
            taken.check(&m).unwrap().as_deref(),
            Some("base/1/1234: ctime")
        );
        // Same stamps, other size or inode: still a change, named by what it is.
        let mut m = sample();
        m.entries[3].size = 0;
        assert_eq!(
            taken.check(&m).unwrap().as_deref(),
            Some("the list of files, their sizes or inodes")
        );
        let mut m = sample();
        m.entries[3].stamp.as_mut().unwrap().inode = 99;
        assert!(taken.check(&m).unwrap().is_some());
        let mut m = sample();
        m.entries.pop();
        assert!(taken.check(&m).unwrap().is_some());
    }

    #[test]
    fn refuses_missing_stamps_and_bad_text() {
        let mut m = sample();
        m.entries[1].stamp = None;
        assert_eq!(
            Fingerprint::of(&m),
            Err(FingerprintError::NoStamp("base/1".into()))
        );
        for bad in [
            "",
            "v1:",
            "v2:1.2:00",
            "v1:1.2:zz",
            "v1:1:00",
            "v1:1.2:0011",
        ] {
            assert!(Fingerprint::parse(bad).is_err(), "{bad}");
        }
    }
}
