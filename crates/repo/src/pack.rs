//! Packs: many compressed data blocks in one object, so a backup of thousands
//! of small files does not become thousands of tiny objects. Each blob carries
//! its own content hash (verifiable alone), the pack ends with an index of its
//! blobs and a keyed seal over the whole pack. In an encrypted repository
//! (pack version 2) each blob's data is sealed on its own with the
//! repository's AEAD, so one block can still be read with a ranged GET.
//! Layout in docs/REPOSITORY.md ("Packs").

use crate::crypto::{Cipher, KeyDomain, Keys};
use crate::{BlockHash, PackId, RepoError, RepoResult};

/// First bytes of every pack.
pub const PACK_MAGIC: &[u8; 8] = b"STRATAPK";
/// First bytes of a pack's index (at its end).
pub const PACK_INDEX_MAGIC: &[u8; 8] = b"STRATAPX";
/// Pack version of unencrypted repositories.
pub const PACK_VERSION_PLAIN: u16 = 1;
/// Pack version of encrypted repositories: every blob's data is AEAD-sealed.
pub const PACK_VERSION_ENCRYPTED: u16 = 2;
/// Pack version of an instance key domain: encrypted as version 2, under the
/// keys of the domain named in the header.
pub const PACK_VERSION_KEY_DOMAIN: u16 = 3;
/// The highest pack version this build reads.
pub const PACK_VERSION: u16 = PACK_VERSION_KEY_DOMAIN;
/// Bytes of a pack's header.
pub const PACK_HEADER_LEN: usize = 16;
/// stored_len u32, raw_len u32, hash 32, compression u8, 3 reserved bytes.
pub const BLOB_HEADER_LEN: usize = 44;
const INDEX_ENTRY_LEN: usize = 32 + 8 + 4 + 4;

/// True for what a pack id is: 32 lower-case hex digits (ids reach object keys).
pub fn valid_pack_id(id: &str) -> bool {
    id.len() == 32
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Blob stored as is (compression would not shrink it).
pub const COMPRESSION_NONE: u8 = 0;
/// Blob compressed with zstd.
pub const COMPRESSION_ZSTD: u8 = 1;

/// One blob as listed in a pack's index. `offset` is where its data starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackEntry {
    /// The block's address.
    pub hash: BlockHash,
    /// Offset in the pack of the blob's data.
    pub offset: u64,
    /// Bytes the blob takes in the pack.
    pub stored_len: u32,
    /// Bytes of the block.
    pub raw_len: u32,
    /// [`COMPRESSION_NONE`] or [`COMPRESSION_ZSTD`].
    pub compression: u8,
}

/// Accumulates blobs in memory until the pack is big enough to store.
pub struct PackBuilder {
    id: PackId,
    buf: Vec<u8>,
    entries: Vec<PackEntry>,
}

impl PackBuilder {
    /// A pack for blobs encoded by [`encode_blob`] with the same `keys`.
    pub fn new(keys: &Keys) -> Self {
        Self::with_buffer(keys, Vec::with_capacity(1 << 20))
    }

    /// A pack built in `buf` (cleared first): a writer hands back the buffer
    /// of a stored pack, so full-size buffers are allocated (and their pages
    /// faulted in) once per backup instead of once per pack.
    pub fn with_buffer(keys: &Keys, mut buf: Vec<u8>) -> Self {
        buf.clear();
        buf.extend_from_slice(PACK_MAGIC);
        if keys.domain() != KeyDomain::REPOSITORY {
            buf.extend_from_slice(&PACK_VERSION_KEY_DOMAIN.to_le_bytes());
            buf.extend_from_slice(&keys.domain().0.to_le_bytes());
            buf.extend_from_slice(&[0; 2]);
        } else {
            let version = if keys.is_encrypted() {
                PACK_VERSION_ENCRYPTED
            } else {
                PACK_VERSION_PLAIN
            };
            buf.extend_from_slice(&version.to_le_bytes());
            buf.extend_from_slice(&[0; 6]);
        }
        PackBuilder {
            id: PackId::new(hex::encode(rand::random::<[u8; 16]>())),
            buf,
            entries: Vec::new(),
        }
    }

    /// The pack's id (its object key is [`crate::pack_key`] of it).
    pub fn id(&self) -> &PackId {
        &self.id
    }

    /// Bytes written so far.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// True when no blob was added.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Appends a blob and returns its index entry.
    pub fn push(
        &mut self,
        hash: BlockHash,
        raw_len: u32,
        compression: u8,
        data: &[u8],
    ) -> PackEntry {
        self.buf
            .extend_from_slice(&(data.len() as u32).to_le_bytes());
        self.buf.extend_from_slice(&raw_len.to_le_bytes());
        self.buf.extend_from_slice(&hash.0);
        self.buf.push(compression);
        self.buf.extend_from_slice(&[0; 3]);
        let entry = PackEntry {
            hash,
            offset: self.buf.len() as u64,
            stored_len: data.len() as u32,
            raw_len,
            compression,
        };
        self.buf.extend_from_slice(data);
        self.entries.push(entry.clone());
        entry
    }

    /// Appends the index and the seal; returns (pack id, bytes).
    pub fn finish(mut self, keys: &Keys) -> (PackId, Vec<u8>) {
        let index_offset = self.buf.len() as u64;
        self.buf
            .extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        for e in &self.entries {
            self.buf.extend_from_slice(&e.hash.0);
            self.buf.extend_from_slice(&e.offset.to_le_bytes());
            self.buf.extend_from_slice(&e.stored_len.to_le_bytes());
            self.buf.extend_from_slice(&e.raw_len.to_le_bytes());
        }
        self.buf.extend_from_slice(&index_offset.to_le_bytes());
        self.buf.extend_from_slice(PACK_INDEX_MAGIC);
        let seal = keys.hasher.hash(&self.buf);
        self.buf.extend_from_slice(&seal.0);
        (self.id, self.buf)
    }
}

/// Compresses a block (zstd at `level`, kept only when smaller) and, in an
/// encrypted repository, seals the result. Returns (compression, stored bytes).
pub fn encode_blob(
    keys: &Keys,
    hash: &BlockHash,
    raw: &[u8],
    level: i32,
) -> RepoResult<(u8, Vec<u8>)> {
    let (compression, data) = compress_block(raw, level);
    match &keys.cipher {
        None => Ok((compression, data)),
        Some(cipher) => {
            let sealed = cipher.seal(&data, &blob_aad(hash, raw.len() as u32, compression))?;
            Ok((compression, sealed))
        }
    }
}

thread_local! {
    /// One zstd context per thread and level, instead of one per block.
    static COMPRESSOR: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { std::cell::RefCell::new(None) };
}

/// zstd when it makes the block smaller, else the raw bytes.
pub(crate) fn compress_block(raw: &[u8], level: i32) -> (u8, Vec<u8>) {
    COMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.as_ref().is_none_or(|(l, _)| *l != level) {
            *slot = zstd::bulk::Compressor::new(level).ok().map(|c| (level, c));
        }
        let compressed = match slot.as_mut() {
            Some((_, compressor)) => compressor.compress(raw).ok(),
            None => None,
        };
        match compressed {
            Some(c) if c.len() < raw.len() => (COMPRESSION_ZSTD, c),
            _ => (COMPRESSION_NONE, raw.to_vec()),
        }
    })
}

/// A blob's AEAD associated data: what its header says about it, so a blob
/// cannot be passed off as another block.
fn blob_aad(hash: &BlockHash, raw_len: u32, compression: u8) -> [u8; 37] {
    let mut aad = [0u8; 37];
    aad[..32].copy_from_slice(&hash.0);
    aad[32..36].copy_from_slice(&raw_len.to_le_bytes());
    aad[36] = compression;
    aad
}

/// The key domain a pack's header names (the repository's before version 3).
pub fn pack_domain(header: &[u8]) -> Option<KeyDomain> {
    if header.len() < PACK_HEADER_LEN || &header[..8] != PACK_MAGIC {
        return None;
    }
    let version = u16::from_le_bytes([header[8], header[9]]);
    Some(if version == PACK_VERSION_KEY_DOMAIN {
        KeyDomain(u32::from_le_bytes(header[10..14].try_into().ok()?))
    } else {
        KeyDomain::REPOSITORY
    })
}

/// Checks a whole pack: its seal, its index against the blob headers, and
/// every blob's content hash. Returns the blobs it holds. `keys` are used
/// for a pack of their domain or of the repository's.
pub fn verify_pack(keys: &Keys, key: &str, bytes: &[u8]) -> RepoResult<Vec<PackEntry>> {
    let corrupt = |why: String| RepoError::Corrupt {
        object: key.to_string(),
        reason: why,
    };
    let min = PACK_HEADER_LEN + 4 + 8 + 8 + 32;
    if bytes.len() < min || &bytes[..8] != PACK_MAGIC {
        return Err(corrupt("not a Strata pack (bad magic or truncated)".into()));
    }
    let version = u16::from_le_bytes([bytes[8], bytes[9]]);
    if version > PACK_VERSION {
        return Err(RepoError::NewerFormat {
            found: version as u32,
            supported: PACK_VERSION as u32,
        });
    }
    let domain = pack_domain(bytes).unwrap_or(KeyDomain::REPOSITORY);
    let keys = keys
        .for_domain(domain)
        .ok_or_else(|| RepoError::DomainLocked {
            object: key.to_string(),
            domain,
        })?;
    let (body, seal) = bytes.split_at(bytes.len() - 32);
    if keys.hasher.hash(body).0 != seal {
        return Err(corrupt(
            "pack seal mismatch: the pack was modified or damaged".into(),
        ));
    }
    if (version >= PACK_VERSION_ENCRYPTED) != keys.is_encrypted()
        || (version == PACK_VERSION_KEY_DOMAIN) != (domain != KeyDomain::REPOSITORY)
    {
        return Err(corrupt(format!(
            "pack version {version} does not match the repository's encryption setting"
        )));
    }
    let tail = &body[body.len() - 16..];
    if &tail[8..] != PACK_INDEX_MAGIC {
        return Err(corrupt("pack index trailer missing".into()));
    }
    let index_offset = u64::from_le_bytes(tail[..8].try_into().expect("8 bytes")) as usize;
    let index_end = body.len() - 16;
    // The offset is read from the pack: checked arithmetic, so no value wraps past the check.
    if index_offset
        .checked_add(4)
        .is_none_or(|end| end > index_end)
    {
        return Err(corrupt("pack index offset out of range".into()));
    }
    let count = u32::from_le_bytes(
        body[index_offset..index_offset + 4]
            .try_into()
            .expect("4 bytes"),
    ) as usize;
    if count
        .checked_mul(INDEX_ENTRY_LEN)
        .and_then(|len| len.checked_add(index_offset + 4))
        != Some(index_end)
    {
        return Err(corrupt("pack index length does not match its count".into()));
    }
    let mut entries = Vec::with_capacity(count);
    let mut pos = PACK_HEADER_LEN;
    for i in 0..count {
        let at = index_offset + 4 + i * INDEX_ENTRY_LEN;
        let rec = &body[at..at + INDEX_ENTRY_LEN];
        let hash = BlockHash(rec[..32].try_into().expect("32 bytes"));
        let offset = u64::from_le_bytes(rec[32..40].try_into().expect("8 bytes"));
        let stored_len = u32::from_le_bytes(rec[40..44].try_into().expect("4 bytes"));
        let raw_len = u32::from_le_bytes(rec[44..48].try_into().expect("4 bytes"));
        if offset as usize != pos + BLOB_HEADER_LEN
            || offset as usize + stored_len as usize > index_offset
        {
            return Err(corrupt(format!("blob {i} lies outside its expected place")));
        }
        let header = &body[pos..pos + BLOB_HEADER_LEN];
        let compression = header[40];
        if header[..4] != stored_len.to_le_bytes()
            || header[4..8] != raw_len.to_le_bytes()
            || header[8..40] != hash.0
        {
            return Err(corrupt(format!("blob {i} header disagrees with the index")));
        }
        let entry = PackEntry {
            hash,
            offset,
            stored_len,
            raw_len,
            compression,
        };
        let data = &body[offset as usize..offset as usize + stored_len as usize];
        let raw = decode_blob(keys, key, &entry, data)?;
        if keys.hasher.hash(&raw) != entry.hash {
            return Err(corrupt(format!("blob {i} content does not match its hash")));
        }
        pos = offset as usize + stored_len as usize;
        entries.push(entry);
    }
    if pos != index_offset {
        return Err(corrupt("unindexed bytes before the pack index".into()));
    }
    Ok(entries)
}

/// Opens (in an encrypted repository) and decompresses one blob's stored bytes.
pub fn decode_blob(keys: &Keys, key: &str, entry: &PackEntry, data: &[u8]) -> RepoResult<Vec<u8>> {
    let opened;
    let data = match &keys.cipher {
        None => data,
        Some(cipher) => {
            opened = open_blob(cipher, key, entry, data)?;
            &opened[..]
        }
    };
    // The length sizes zstd's output buffer: never take it at its word.
    if entry.raw_len > crate::MAX_BLOCK_SIZE {
        return Err(RepoError::Corrupt {
            object: key.to_string(),
            reason: format!(
                "blob at offset {} claims {} bytes, more than any block",
                entry.offset, entry.raw_len
            ),
        });
    }
    let raw = match entry.compression {
        COMPRESSION_NONE => data.to_vec(),
        COMPRESSION_ZSTD => zstd::bulk::decompress(data, entry.raw_len as usize).map_err(|e| {
            RepoError::Corrupt {
                object: key.to_string(),
                reason: format!("blob at offset {} does not decompress: {e}", entry.offset),
            }
        })?,
        other => {
            return Err(RepoError::Corrupt {
                object: key.to_string(),
                reason: format!("unknown compression {other}"),
            })
        }
    };
    if raw.len() != entry.raw_len as usize {
        return Err(RepoError::Corrupt {
            object: key.to_string(),
            reason: format!("blob at offset {} has the wrong length", entry.offset),
        });
    }
    Ok(raw)
}

fn open_blob(cipher: &Cipher, key: &str, entry: &PackEntry, data: &[u8]) -> RepoResult<Vec<u8>> {
    cipher
        .open(
            data,
            &blob_aad(&entry.hash, entry.raw_len, entry.compression),
        )
        .ok_or_else(|| RepoError::Corrupt {
            object: key.to_string(),
            reason: format!(
                "blob at offset {} cannot be decrypted: it was modified or damaged",
                entry.offset
            ),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::crypto::KeySource;

    fn build(keys: &Keys) -> Vec<u8> {
        let mut pack = PackBuilder::new(keys);
        for block in [b"first block".repeat(50), b"second".to_vec()] {
            let hash = keys.hasher.hash(&block);
            let (c, data) = encode_blob(keys, &hash, &block, 1).unwrap();
            pack.push(hash, block.len() as u32, c, &data);
        }
        pack.finish(keys).1
    }

    fn check(keys: &Keys, bytes: &[u8]) {
        let entries = verify_pack(keys, "p", bytes).unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[1].raw_len, 6);
        assert_eq!(entries[0].compression, COMPRESSION_ZSTD);
        for i in (0..bytes.len()).step_by(7) {
            let mut bad = bytes.to_vec();
            bad[i] ^= 0x80;
            assert!(verify_pack(keys, "p", &bad).is_err(), "flip at {i}");
        }
    }

    #[test]
    fn index_offsets_and_counts_that_would_wrap_are_refused() {
        let keys = Keys::plain([3; 32]);
        let good = build(&keys);
        let reseal = |mut bytes: Vec<u8>| {
            let body = bytes.len() - 32;
            let seal = keys.hasher.hash(&bytes[..body]).0;
            bytes[body..].copy_from_slice(&seal);
            bytes
        };
        // The trailer's offset (the 8 bytes before its magic), set near the top of the range:
        // with the seal made again, as a writer of an unencrypted repository can.
        let trailer = good.len() - 32 - 16;
        for offset in [u64::MAX, u64::MAX - 3, u64::MAX - 2] {
            let mut bad = good.clone();
            bad[trailer..trailer + 8].copy_from_slice(&offset.to_le_bytes());
            let err = verify_pack(&keys, "p", &reseal(bad)).unwrap_err();
            assert!(err.to_string().contains("offset out of range"), "{err}");
        }
        // A count whose entries would reach past the address space.
        let index_offset =
            u64::from_le_bytes(good[trailer..trailer + 8].try_into().unwrap()) as usize;
        let mut bad = good.clone();
        bad[index_offset..index_offset + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        let err = verify_pack(&keys, "p", &reseal(bad)).unwrap_err();
        assert!(
            err.to_string().contains("does not match its count"),
            "{err}"
        );
    }

    #[test]
    fn build_verify_and_detect_flips() {
        let keys = Keys::plain([3; 32]);
        check(&keys, &build(&keys));
    }

    #[test]
    fn encrypted_packs_hide_blocks_and_need_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("k");
        std::fs::write(&file, "k".repeat(32)).unwrap();
        let (keys, _) = Keys::generate(&KeySource::KeyFile(file), "r").unwrap();
        let bytes = build(&keys);
        assert!(!bytes.windows(11).any(|w| w == b"first block"));
        assert!(!bytes.windows(6).any(|w| w == b"second"));
        check(&keys, &bytes);
        assert!(verify_pack(&Keys::plain([3; 32]), "p", &bytes).is_err());
        let plain = Keys::plain([3; 32]);
        assert!(verify_pack(&keys, "p", &build(&plain)).is_err());
    }
}
