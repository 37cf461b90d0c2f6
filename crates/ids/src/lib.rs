//! Strata's identifiers as distinct types, so an instance id cannot be passed
//! where a backup id is meant (or a pack id where either is).
//!
//! This crate sits below both the repository and the catalog, which share
//! these ids but not each other. Every id serializes exactly as the plain
//! string or integer it wraps (`#[serde(transparent)]`): the repository's
//! JSON, the catalog's rows and the API's output are unchanged by them.
//! The types do not validate: the rules for a well-formed id live where ids
//! enter Strata (e.g. the catalog's `Instance::valid_id`).
#![warn(missing_docs)]

use std::borrow::Borrow;
use std::fmt;
use std::ops::Deref;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Defines a string id newtype with the conversions and comparisons all ids share.
macro_rules! string_id {
    ($(#[$meta:meta])* $name:ident) => {
        $(#[$meta])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Default, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// Wraps a string as this kind of id (no validation).
            pub fn new(id: impl Into<String>) -> Self {
                Self(id.into())
            }

            /// The id as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// The id's string, consuming the id.
            pub fn into_string(self) -> String {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl Deref for $name {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl From<String> for $name {
            fn from(id: String) -> Self {
                Self(id)
            }
        }

        impl From<&str> for $name {
            fn from(id: &str) -> Self {
                Self(id.to_owned())
            }
        }

        impl From<&String> for $name {
            fn from(id: &String) -> Self {
                Self(id.clone())
            }
        }

        impl From<&$name> for $name {
            fn from(id: &$name) -> Self {
                id.clone()
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }

        impl PartialEq<String> for $name {
            fn eq(&self, other: &String) -> bool {
                &self.0 == other
            }
        }

        impl PartialEq<$name> for str {
            fn eq(&self, other: &$name) -> bool {
                self == other.0
            }
        }

        impl PartialEq<$name> for &str {
            fn eq(&self, other: &$name) -> bool {
                *self == other.0
            }
        }

        impl PartialEq<$name> for String {
            fn eq(&self, other: &$name) -> bool {
                *self == other.0
            }
        }
    };
}

string_id!(
    /// Id of a registered PostgreSQL instance (`db-1`, a clone's `clone-…`).
    InstanceId
);

string_id!(
    /// Id of a backup set, the name of its manifest in the repository.
    BackupId
);

string_id!(
    /// Id of a pack in the repository (`packs/<2 hex>/<id>.pack`).
    PackId
);

/// Id of a job, assigned by the catalog.
#[derive(
    Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct JobId(i64);

impl JobId {
    /// Wraps a catalog-assigned job number.
    pub const fn new(id: i64) -> Self {
        Self(id)
    }

    /// The job number, as the catalog stores it.
    pub const fn get(self) -> i64 {
        self.0
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for JobId {
    type Err = std::num::ParseIntError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse().map(Self)
    }
}

impl From<i64> for JobId {
    fn from(id: i64) -> Self {
        Self(id)
    }
}

impl From<JobId> for i64 {
    fn from(id: JobId) -> i64 {
        id.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn ids_serialize_as_the_value_they_wrap() {
        let id = BackupId::from("b-20261206-0001");
        assert_eq!(serde_json::to_string(&id).unwrap(), "\"b-20261206-0001\"");
        let back: BackupId = serde_json::from_str("\"b-20261206-0001\"").unwrap();
        assert_eq!(back, id);
        assert_eq!(serde_json::to_string(&JobId::new(42)).unwrap(), "42");
        let job: JobId = serde_json::from_str("42").unwrap();
        assert_eq!(job.get(), 42);
        let ids: Vec<InstanceId> = serde_json::from_str(r#"["a","b"]"#).unwrap();
        assert_eq!(ids, vec![InstanceId::from("a"), InstanceId::from("b")]);
    }

    #[test]
    fn maps_keyed_by_ids_are_looked_up_by_str() {
        let mut m = HashMap::new();
        m.insert(PackId::from("00ab"), 1);
        assert_eq!(m.get("00ab"), Some(&1));
        assert_eq!(m.get("00ac"), None);
    }

    #[test]
    fn ids_compare_with_strings_and_display_plainly() {
        let id = InstanceId::from("db-1".to_string());
        assert!(id == "db-1");
        assert!(*"db-1" == id);
        assert_eq!(id.to_string(), "db-1");
        assert_eq!(id.as_str(), "db-1");
        assert!(id.starts_with("db-"));
        assert_eq!("7".parse::<JobId>().unwrap(), JobId::new(7));
        assert!("x".parse::<JobId>().is_err());
        assert_eq!(JobId::new(7).to_string(), "7");
    }
}
