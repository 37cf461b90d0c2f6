//! Sealed objects: every repository object other than a pack (manifests, WAL
//! segments, timeline histories, instance records) is stored in one envelope
//! whose last 32 bytes are a keyed BLAKE3 hash of everything before them, so a
//! single flipped byte anywhere is detected. The layout is specified in
//! docs/REPOSITORY.md ("Sealed objects").

use serde::{de::DeserializeOwned, Serialize};

use crate::{Hasher, RepoError, RepoResult};

pub const OBJECT_MAGIC: &[u8; 8] = b"STRATAOB";
pub const OBJECT_VERSION: u16 = 1;
const HEADER_LEN: usize = 16;
const FLAG_ZSTD: u8 = 1;

/// What a sealed object holds; stored in its header and checked on read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ObjectKind {
    Manifest = 1,
    WalSegment = 2,
    TimelineHistory = 3,
    Instance = 4,
}

impl ObjectKind {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => ObjectKind::Manifest,
            2 => ObjectKind::WalSegment,
            3 => ObjectKind::TimelineHistory,
            4 => ObjectKind::Instance,
            _ => return None,
        })
    }
}

/// Builds the bytes of a sealed object: JSON metadata plus an optional
/// payload, zstd-compressed when `compress_level` is given.
pub fn seal<M: Serialize>(
    hasher: &Hasher,
    kind: ObjectKind,
    meta: &M,
    payload: &[u8],
    compress_level: Option<i32>,
) -> RepoResult<Vec<u8>> {
    match compress_level {
        Some(level) => {
            let body = zstd::bulk::compress(payload, level)
                .map_err(|e| RepoError::Format(e.to_string()))?;
            seal_body(hasher, kind, meta, FLAG_ZSTD, &body)
        }
        None => seal_body(hasher, kind, meta, 0, payload),
    }
}

/// Like [`seal`] for a payload already compressed: `zstd` holds one or more
/// zstd frames (a reader decompresses them as one stream).
pub fn seal_compressed<M: Serialize>(
    hasher: &Hasher,
    kind: ObjectKind,
    meta: &M,
    zstd: &[u8],
) -> RepoResult<Vec<u8>> {
    seal_body(hasher, kind, meta, FLAG_ZSTD, zstd)
}

fn seal_body<M: Serialize>(
    hasher: &Hasher,
    kind: ObjectKind,
    meta: &M,
    flags: u8,
    body: &[u8],
) -> RepoResult<Vec<u8>> {
    let meta = serde_json::to_vec(meta).map_err(|e| RepoError::Format(e.to_string()))?;
    let mut out = Vec::with_capacity(HEADER_LEN + meta.len() + body.len() + 32);
    out.extend_from_slice(OBJECT_MAGIC);
    out.extend_from_slice(&OBJECT_VERSION.to_le_bytes());
    out.push(kind as u8);
    out.push(flags);
    out.extend_from_slice(&(meta.len() as u32).to_le_bytes());
    out.extend_from_slice(&meta);
    out.extend_from_slice(body);
    let tag = hasher.hash(&out);
    out.extend_from_slice(&tag.0);
    Ok(out)
}

/// A sealed object whose seal has been checked.
pub struct Opened<M> {
    pub meta: M,
    pub payload: Vec<u8>,
}

/// Checks the seal, version and kind of `bytes` and decodes it. `key` names
/// the object in error messages.
pub fn open<M: DeserializeOwned>(
    hasher: &Hasher,
    key: &str,
    expected: ObjectKind,
    bytes: &[u8],
) -> RepoResult<Opened<M>> {
    let corrupt = |why: &str| RepoError::Corrupt {
        object: key.to_string(),
        reason: why.to_string(),
    };
    if bytes.len() < HEADER_LEN + 32 || &bytes[..8] != OBJECT_MAGIC {
        return Err(corrupt("not a Strata object (bad magic or truncated)"));
    }
    let (body, tag) = bytes.split_at(bytes.len() - 32);
    if hasher.hash(body).0 != tag {
        return Err(corrupt("seal mismatch: the object was modified or damaged"));
    }
    let version = u16::from_le_bytes([bytes[8], bytes[9]]);
    if version > OBJECT_VERSION {
        return Err(RepoError::NewerFormat {
            found: version as u32,
            supported: OBJECT_VERSION as u32,
        });
    }
    let kind = ObjectKind::from_u8(bytes[10]);
    if kind != Some(expected) {
        return Err(corrupt(&format!(
            "object kind {} where {:?} was expected",
            bytes[10], expected
        )));
    }
    let flags = bytes[11];
    let meta_len = u32::from_le_bytes([bytes[12], bytes[13], bytes[14], bytes[15]]) as usize;
    if HEADER_LEN + meta_len > body.len() {
        return Err(corrupt("metadata length beyond object end"));
    }
    let meta = serde_json::from_slice(&body[HEADER_LEN..HEADER_LEN + meta_len])
        .map_err(|e| corrupt(&format!("metadata: {e}")))?;
    let stored = &body[HEADER_LEN + meta_len..];
    let payload = if flags & FLAG_ZSTD != 0 {
        zstd::stream::decode_all(stored).map_err(|e| corrupt(&format!("payload: {e}")))?
    } else {
        stored.to_vec()
    };
    Ok(Opened { meta, payload })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_every_flipped_byte_is_caught() {
        let hasher = Hasher::new([7; 32]);
        let sealed = seal(
            &hasher,
            ObjectKind::WalSegment,
            &serde_json::json!({"a": 1}),
            b"payload bytes payload bytes",
            Some(3),
        )
        .unwrap();
        let opened: Opened<serde_json::Value> =
            open(&hasher, "k", ObjectKind::WalSegment, &sealed).unwrap();
        assert_eq!(opened.payload, b"payload bytes payload bytes");
        assert_eq!(opened.meta["a"], 1);
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 0x01;
            assert!(
                open::<serde_json::Value>(&hasher, "k", ObjectKind::WalSegment, &bad).is_err(),
                "flip at {i} not detected"
            );
        }
        assert!(open::<serde_json::Value>(&hasher, "k", ObjectKind::Manifest, &sealed).is_err());
    }
}
