//! Sealed objects: every repository object other than a pack (manifests, WAL
//! segments, timeline histories, instance records, block index runs) is
//! stored in one envelope.
//! Unencrypted (version 1), its last 32 bytes are a keyed BLAKE3 hash of
//! everything before them, so a single flipped byte anywhere is detected. In an
//! encrypted repository (version 2) everything after the 12-byte header is
//! sealed with the repository's AEAD, the header being its associated data.
//! The layout is specified in docs/REPOSITORY.md ("Sealed objects").

use std::io::Read;

use serde::{de::DeserializeOwned, Serialize};

use crate::crypto::{KeyDomain, Keys};
use crate::{RepoError, RepoResult};

/// First bytes of every sealed object.
pub const OBJECT_MAGIC: &[u8; 8] = b"STRATAOB";
/// Envelope version of unencrypted repositories.
pub const OBJECT_VERSION_PLAIN: u16 = 1;
/// Envelope version of encrypted repositories.
pub const OBJECT_VERSION_ENCRYPTED: u16 = 2;
/// Envelope version of an instance key domain: encrypted as version 2 under
/// the keys of the domain the header names.
pub const OBJECT_VERSION_KEY_DOMAIN: u16 = 3;
/// The highest envelope version this build reads.
pub const OBJECT_VERSION: u16 = OBJECT_VERSION_KEY_DOMAIN;
/// Magic, version, kind, flags.
const FIXED_LEN: usize = 12;
/// Version 3 adds the key domain (u32).
const DOMAIN_HEADER_LEN: usize = FIXED_LEN + 4;
const FLAG_ZSTD: u8 = 1;
const FLAG_ENCRYPTED: u8 = 2;

/// What a sealed object holds; stored in its header and checked on read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ObjectKind {
    /// A backup manifest.
    Manifest = 1,
    /// A WAL segment (complete or partial).
    WalSegment = 2,
    /// A timeline history file.
    TimelineHistory = 3,
    /// An instance record.
    Instance = 4,
    /// A run of an instance's block index.
    IndexRun = 5,
}

impl ObjectKind {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => ObjectKind::Manifest,
            2 => ObjectKind::WalSegment,
            3 => ObjectKind::TimelineHistory,
            4 => ObjectKind::Instance,
            5 => ObjectKind::IndexRun,
            _ => return None,
        })
    }
}

/// Builds the bytes of a sealed object: JSON metadata plus an optional
/// payload, zstd-compressed when `compress_level` is given.
pub fn seal<M: Serialize>(
    keys: &Keys,
    kind: ObjectKind,
    meta: &M,
    payload: &[u8],
    compress_level: Option<i32>,
) -> RepoResult<Vec<u8>> {
    match compress_level {
        Some(level) => {
            let body = zstd::bulk::compress(payload, level)
                .map_err(|e| RepoError::Format(e.to_string()))?;
            // A payload that compresses past what a reader accepts (a manifest of mostly
            // identical blocks, all zeros) is stored as it is, so it can always be opened.
            if payload.len() as u64 > payload_limit(kind, body.len()) {
                return seal_body(keys, kind, meta, 0, payload);
            }
            seal_body(keys, kind, meta, FLAG_ZSTD, &body)
        }
        None => seal_body(keys, kind, meta, 0, payload),
    }
}

/// Like [`seal`] for a payload already compressed: `zstd` holds one or more
/// zstd frames (a reader decompresses them as one stream).
pub fn seal_compressed<M: Serialize>(
    keys: &Keys,
    kind: ObjectKind,
    meta: &M,
    zstd: &[u8],
) -> RepoResult<Vec<u8>> {
    seal_body(keys, kind, meta, FLAG_ZSTD, zstd)
}

fn seal_body<M: Serialize>(
    keys: &Keys,
    kind: ObjectKind,
    meta: &M,
    flags: u8,
    body: &[u8],
) -> RepoResult<Vec<u8>> {
    let meta = serde_json::to_vec(meta).map_err(|e| RepoError::Format(e.to_string()))?;
    let mut flags = flags;
    let domain = keys.domain();
    let version = if domain != KeyDomain::REPOSITORY {
        flags |= FLAG_ENCRYPTED;
        OBJECT_VERSION_KEY_DOMAIN
    } else if keys.is_encrypted() {
        flags |= FLAG_ENCRYPTED;
        OBJECT_VERSION_ENCRYPTED
    } else {
        OBJECT_VERSION_PLAIN
    };
    let mut out = Vec::with_capacity(DOMAIN_HEADER_LEN + 4 + meta.len() + body.len() + 40);
    out.extend_from_slice(OBJECT_MAGIC);
    out.extend_from_slice(&version.to_le_bytes());
    out.push(kind as u8);
    out.push(flags);
    if version == OBJECT_VERSION_KEY_DOMAIN {
        out.extend_from_slice(&domain.0.to_le_bytes());
    }
    match &keys.cipher {
        Some(cipher) => {
            let mut inner = Vec::with_capacity(4 + meta.len() + body.len());
            inner.extend_from_slice(&(meta.len() as u32).to_le_bytes());
            inner.extend_from_slice(&meta);
            inner.extend_from_slice(body);
            let sealed = cipher.seal(&inner, &out)?;
            out.extend_from_slice(&sealed);
        }
        None => {
            // Written in place: a WAL segment's megabytes are copied once.
            out.extend_from_slice(&(meta.len() as u32).to_le_bytes());
            out.extend_from_slice(&meta);
            out.extend_from_slice(body);
            let tag = keys.hasher.hash(&out);
            out.extend_from_slice(&tag.0);
        }
    }
    Ok(out)
}

/// The key domain a sealed object's header names and the header's length
/// (the repository's domain before version 3).
pub fn object_domain(bytes: &[u8]) -> (KeyDomain, usize) {
    let version = bytes
        .get(8..10)
        .map(|v| u16::from_le_bytes([v[0], v[1]]))
        .unwrap_or(0);
    match bytes.get(FIXED_LEN..DOMAIN_HEADER_LEN) {
        Some(id) if version == OBJECT_VERSION_KEY_DOMAIN => (
            KeyDomain(u32::from_le_bytes([id[0], id[1], id[2], id[3]])),
            DOMAIN_HEADER_LEN,
        ),
        _ => (KeyDomain::REPOSITORY, FIXED_LEN),
    }
}

/// A sealed object whose seal has been checked.
pub struct Opened<M> {
    /// The object's metadata.
    pub meta: M,
    /// The object's payload (e.g. WAL bytes).
    pub payload: Vec<u8>,
}

/// Largest payload a WAL object decompresses to: PostgreSQL's largest WAL segment.
const MAX_WAL_PAYLOAD: u64 = 1 << 30;
/// How many times its stored size any other payload may decompress to, and the size every
/// payload may reach whatever its ratio. JSON of hashes and counts compresses a few times;
/// a payload of zeros a thousand times and more, which is how a writer of the repository
/// (who holds the seal's key when the repository is not encrypted) would make an object of
/// a few megabytes that fills memory when opened.
const MAX_PAYLOAD_RATIO: u64 = 64;
const MIN_PAYLOAD_LIMIT: u64 = 64 << 20;

/// The most a payload of `kind`, stored compressed in `stored` bytes, may decompress to.
fn payload_limit(kind: ObjectKind, stored: usize) -> u64 {
    match kind {
        ObjectKind::WalSegment => MAX_WAL_PAYLOAD,
        _ => (stored as u64)
            .saturating_mul(MAX_PAYLOAD_RATIO)
            .max(MIN_PAYLOAD_LIMIT),
    }
}

/// Checks the seal, version and kind of `bytes` and decodes it. `key` names
/// the object in error messages.
pub fn open<M: DeserializeOwned>(
    keys: &Keys,
    key: &str,
    expected: ObjectKind,
    bytes: &[u8],
) -> RepoResult<Opened<M>> {
    let corrupt = |why: &str| RepoError::Corrupt {
        object: key.to_string(),
        reason: why.to_string(),
    };
    if bytes.len() < DOMAIN_HEADER_LEN + 32 || &bytes[..8] != OBJECT_MAGIC {
        return Err(corrupt("not a Strata object (bad magic or truncated)"));
    }
    let version = u16::from_le_bytes([bytes[8], bytes[9]]);
    let flags = bytes[11];
    let encrypted = flags & FLAG_ENCRYPTED != 0;
    let (domain, header_len) = object_domain(bytes);
    let keys = keys
        .for_domain(domain)
        .ok_or_else(|| RepoError::DomainLocked {
            object: key.to_string(),
            domain,
        })?;
    let inner = match (&keys.cipher, encrypted) {
        (None, false) => {
            let (body, tag) = bytes.split_at(bytes.len() - 32);
            if keys.hasher.hash(body).0 != tag {
                return Err(corrupt("seal mismatch: the object was modified or damaged"));
            }
            body[FIXED_LEN..].to_vec()
        }
        (Some(cipher), true) => {
            let (header, sealed) = bytes.split_at(header_len);
            cipher
                .open(sealed, header)
                .ok_or_else(|| corrupt("cannot be decrypted: the object was modified or damaged"))?
        }
        (None, true) => {
            return Err(corrupt("encrypted object in an unencrypted repository"));
        }
        (Some(_), false) => {
            return Err(corrupt("unencrypted object in an encrypted repository"));
        }
    };
    if version > OBJECT_VERSION {
        return Err(RepoError::NewerFormat {
            found: version as u32,
            supported: OBJECT_VERSION as u32,
        });
    }
    if encrypted != (version >= OBJECT_VERSION_ENCRYPTED) {
        return Err(corrupt(
            "envelope version does not match its encryption flag",
        ));
    }
    let kind = ObjectKind::from_u8(bytes[10]);
    if kind != Some(expected) {
        return Err(corrupt(&format!(
            "object kind {} where {:?} was expected",
            bytes[10], expected
        )));
    }
    if inner.len() < 4 {
        return Err(corrupt("truncated metadata length"));
    }
    let meta_len = u32::from_le_bytes([inner[0], inner[1], inner[2], inner[3]]) as usize;
    if 4 + meta_len > inner.len() {
        return Err(corrupt("metadata length beyond object end"));
    }
    let meta = serde_json::from_slice(&inner[4..4 + meta_len])
        .map_err(|e| corrupt(&format!("metadata: {e}")))?;
    let stored = &inner[4 + meta_len..];
    let payload = if flags & FLAG_ZSTD != 0 {
        let limit = payload_limit(expected, stored.len());
        let mut out = Vec::new();
        zstd::stream::read::Decoder::new(stored)
            .and_then(|d| d.take(limit + 1).read_to_end(&mut out))
            .map_err(|e| corrupt(&format!("payload: {e}")))?;
        if out.len() as u64 > limit {
            return Err(corrupt(&format!(
                "payload decompresses to more than {limit} bytes (a decompression bomb?)"
            )));
        }
        out
    } else {
        stored.to_vec()
    };
    Ok(Opened { meta, payload })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::KeySource;

    fn round_trip(keys: &Keys) -> Vec<u8> {
        let sealed = seal(
            keys,
            ObjectKind::WalSegment,
            &serde_json::json!({"a": 1}),
            b"payload bytes payload bytes",
            Some(3),
        )
        .unwrap();
        let opened: Opened<serde_json::Value> =
            open(keys, "k", ObjectKind::WalSegment, &sealed).unwrap();
        assert_eq!(opened.payload, b"payload bytes payload bytes");
        assert_eq!(opened.meta["a"], 1);
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 0x01;
            assert!(
                open::<serde_json::Value>(keys, "k", ObjectKind::WalSegment, &bad).is_err(),
                "flip at {i} not detected"
            );
        }
        assert!(open::<serde_json::Value>(keys, "k", ObjectKind::Manifest, &sealed).is_err());
        sealed
    }

    #[test]
    fn payloads_that_decompress_past_their_limit_are_refused() {
        let keys = Keys::plain([7; 32]);
        let meta = serde_json::json!({});
        // One frame of 8 MiB of zeros takes a few hundred bytes; nine of them, one after the
        // other, decompress to 72 MiB: past the 64 MiB any payload other than WAL may reach.
        let frame = zstd::bulk::compress(&vec![0u8; 8 << 20], 3).unwrap();
        assert!(frame.len() < 4096, "{}", frame.len());
        let bomb: Vec<u8> = frame.repeat(9);
        for kind in [
            ObjectKind::Manifest,
            ObjectKind::IndexRun,
            ObjectKind::TimelineHistory,
        ] {
            let sealed = seal_compressed(&keys, kind, &meta, &bomb).unwrap();
            let err = open::<serde_json::Value>(&keys, "k", kind, &sealed)
                .err()
                .expect("refused");
            assert!(err.to_string().contains("decompression bomb"), "{err}");
        }
        // Eight frames (64 MiB) are within the limit, and a WAL payload may reach 1 GiB: a
        // segment of zeros after a switch compresses as well as this.
        let eight = seal_compressed(&keys, ObjectKind::Manifest, &meta, &frame.repeat(8)).unwrap();
        let opened = open::<serde_json::Value>(&keys, "k", ObjectKind::Manifest, &eight).unwrap();
        assert_eq!(opened.payload.len(), 64 << 20);
        assert!(opened.payload.iter().all(|b| *b == 0));
        let wal = seal_compressed(&keys, ObjectKind::WalSegment, &meta, &bomb).unwrap();
        let opened = open::<serde_json::Value>(&keys, "k", ObjectKind::WalSegment, &wal).unwrap();
        assert_eq!(opened.payload.len(), 72 << 20);
        // What Strata writes it can read: a payload compressing past the limit is stored
        // as it is.
        let zeros = vec![0u8; 72 << 20];
        let sealed = seal(&keys, ObjectKind::Manifest, &meta, &zeros, Some(3)).unwrap();
        assert!(sealed.len() > 72 << 20);
        let opened = open::<serde_json::Value>(&keys, "k", ObjectKind::Manifest, &sealed).unwrap();
        assert_eq!(opened.payload, zeros);
        let small = seal(
            &keys,
            ObjectKind::Manifest,
            &meta,
            &zeros[..1 << 20],
            Some(3),
        )
        .unwrap();
        assert!(small.len() < 64 << 10);
        // WAL is bounded by the largest segment, the rest by their stored size.
        assert_eq!(payload_limit(ObjectKind::WalSegment, 10), 1 << 30);
        assert_eq!(payload_limit(ObjectKind::Manifest, 10 << 20), 640 << 20);
    }

    #[test]
    fn round_trip_and_every_flipped_byte_is_caught() {
        let sealed = round_trip(&Keys::plain([7; 32]));
        // Version 1 objects are exactly what earlier builds wrote.
        assert_eq!(&sealed[8..10], &[1, 0]);
        assert_eq!(u32::from_le_bytes(sealed[12..16].try_into().unwrap()), 7);
        assert_eq!(&sealed[16..23], br#"{"a":1}"#);
    }

    #[test]
    fn encrypted_objects_hide_metadata_and_refuse_mixing() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("k");
        std::fs::write(&file, "0123456789abcdef0123456789abcdef").unwrap();
        let (keys, _) = Keys::generate(&KeySource::KeyFile(file), "r").unwrap();
        let sealed = round_trip(&keys);
        assert_eq!(&sealed[8..10], &[2, 0]);
        assert!(!sealed.windows(3).any(|w| w == br#""a""#));
        let plain = Keys::plain([7; 32]);
        let err = open::<serde_json::Value>(&plain, "k", ObjectKind::WalSegment, &sealed)
            .err()
            .unwrap();
        assert!(err.to_string().contains("encrypted object"), "{err}");
        let v1 = seal(&plain, ObjectKind::Instance, &1, b"", None).unwrap();
        assert!(open::<u32>(&keys, "k", ObjectKind::Instance, &v1).is_err());
    }
}
