//! Names and paths that reach the agent from the network, checked before they touch the disk.
//!
//! A snapshot or clone name becomes one directory entry under the agent's own directories, so
//! it follows the rule of instance ids (`[A-Za-z0-9_-]`, 1 to 64 bytes): no separator, no dot,
//! nothing a shell or a path could read differently. A path inside a snapshot is relative,
//! `/`-separated, and has no empty, `.` or `..` component; opening it additionally goes through
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)` (see `snapshot`), so even a symlink
//! planted on the disk cannot lead outside.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A name or path parameter that breaks the rules above.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} {shown} {reason}")]
pub struct InvalidName {
    /// Which parameter (`"snapshot name"`, `"clone name"`, `"path"`).
    pub what: &'static str,
    /// The value as shown in messages (quoted, escaped, shortened).
    pub shown: String,
    /// Why it is refused.
    pub reason: &'static str,
}

fn shown(value: &str) -> String {
    let mut s: String = value.chars().take(80).collect();
    if value.chars().count() > 80 {
        s.push('…');
    }
    format!("{s:?}")
}

/// The name rule shared by snapshots and clones (`Instance::valid_id`'s rule).
fn check_name(what: &'static str, value: &str) -> Result<(), InvalidName> {
    let refuse = |reason| InvalidName {
        what,
        shown: shown(value),
        reason,
    };
    if value.is_empty() {
        return Err(refuse("is empty"));
    }
    if value.len() > 64 {
        return Err(refuse("is longer than 64 bytes"));
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(refuse("may hold only letters, digits, '_' and '-'"));
    }
    Ok(())
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Checks `value` against the name rule.
            pub fn new(value: &str) -> Result<Self, InvalidName> {
                check_name($what, value)?;
                Ok($name(value.to_string()))
            }

            /// The name as a string.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = InvalidName;
            fn try_from(value: String) -> Result<Self, InvalidName> {
                check_name($what, &value)?;
                Ok($name(value))
            }
        }

        impl From<$name> for String {
            fn from(n: $name) -> String {
                n.0
            }
        }

        impl std::str::FromStr for $name {
            type Err = InvalidName;
            fn from_str(s: &str) -> Result<Self, InvalidName> {
                $name::new(s)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

name_type!(
    /// The name of a snapshot: its directory under the snapshot directory.
    SnapshotName,
    "snapshot name"
);
name_type!(
    /// The name of a clone: its directory under the clone directory.
    CloneName,
    "clone name"
);

/// Longest path accepted inside a snapshot (PostgreSQL's MAXPGPATH is 1024).
const MAX_PATH: usize = 1024;

/// A relative path inside a snapshot, `/`-separated, each component a plain name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RelPath(String);

impl RelPath {
    /// Checks `value`: not empty, not absolute, at most 1024 bytes, no NUL, no empty, `.` or
    /// `..` component.
    pub fn new(value: &str) -> Result<Self, InvalidName> {
        let refuse = |reason| InvalidName {
            what: "path",
            shown: shown(value),
            reason,
        };
        if value.is_empty() {
            return Err(refuse("is empty"));
        }
        if value.len() > MAX_PATH {
            return Err(refuse("is longer than 1024 bytes"));
        }
        if value.starts_with('/') {
            return Err(refuse("is absolute; paths are relative to the snapshot"));
        }
        if value.contains('\0') {
            return Err(refuse("contains a NUL byte"));
        }
        for part in value.split('/') {
            match part {
                "" => return Err(refuse("has an empty component")),
                "." | ".." => return Err(refuse("has a '.' or '..' component")),
                _ => {}
            }
        }
        Ok(RelPath(value.to_string()))
    }

    /// The path as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for RelPath {
    type Error = InvalidName;
    fn try_from(value: String) -> Result<Self, InvalidName> {
        RelPath::new(&value)
    }
}

impl From<RelPath> for String {
    fn from(p: RelPath) -> String {
        p.0
    }
}

impl fmt::Display for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_instance_id_rule() {
        for ok in ["a", "snap-2026_12_06", &"x".repeat(64), "A-Z_0-9"] {
            assert!(SnapshotName::new(ok).is_ok(), "{ok}");
            assert!(CloneName::new(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "..",
            ".",
            "a/b",
            "/abs",
            "a b",
            "a.b",
            "a\nb",
            "a\0b",
            "é",
            "a=b",
            "'q'",
            &"x".repeat(65),
        ] {
            let e = SnapshotName::new(bad).unwrap_err();
            assert_eq!(e.what, "snapshot name");
            assert!(CloneName::new(bad).is_err(), "{bad:?}");
        }
        let e = SnapshotName::new("../etc").unwrap_err();
        assert_eq!(
            e.to_string(),
            "snapshot name \"../etc\" may hold only letters, digits, '_' and '-'"
        );
    }

    #[test]
    fn names_are_checked_when_deserialized() {
        assert!(serde_json::from_str::<SnapshotName>("\"ok_1\"").is_ok());
        assert!(serde_json::from_str::<SnapshotName>("\"../x\"").is_err());
        assert!(serde_json::from_str::<RelPath>("\"/etc/passwd\"").is_err());
    }

    #[test]
    fn paths_are_relative_and_plain() {
        for ok in [
            "PG_VERSION",
            "base/1/1259",
            "pg_tblspc/16384/PG_15_202209061/5/16385",
            "a..b/c",
        ] {
            assert!(RelPath::new(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "/etc/passwd",
            "..",
            "../x",
            "a/../../x",
            "a/./b",
            "./a",
            "a//b",
            "a/",
            "a\0b",
            &"a/".repeat(600),
        ] {
            assert!(RelPath::new(bad).is_err(), "{bad:?}");
        }
    }
}
