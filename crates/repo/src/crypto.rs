//! Encryption at rest and the repository's keys.
//!
//! An encrypted repository has one random 256-bit data key. Two keys are
//! derived from it with BLAKE3's key derivation mode: the AEAD key that seals
//! every pack blob and every sealed object (manifests, WAL, histories,
//! instance records) with XChaCha20-Poly1305 (draft-irtf-cfrg-xchacha: 192-bit
//! nonces, so random nonces never collide in practice), and the key of the
//! keyed BLAKE3 block hash, which therefore never appears in the clear. The
//! data key itself is stored in `strata-repo.json` only wrapped (sealed with
//! the same AEAD) under a master key, which comes from a key file or from a
//! passphrase through Argon2id (RFC 9106). Rotating the master key re-wraps
//! the data key; no data object changes. A wrong master key fails the
//! unwrap's authentication, so it is reported as such and never produces
//! garbage. The format is specified in docs/REPOSITORY.md ("Encryption").
//!
//! A repository without encryption keeps its hash key in `strata-repo.json`,
//! as format version 1 always did.

use std::path::PathBuf;
use std::sync::Arc;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::{Hasher, RepoError, RepoResult};

/// The AEAD that seals objects and blocks of an encrypted repository.
pub const CIPHER_NAME: &str = "xchacha20-poly1305";
/// Nonce bytes at the start of every sealed message (random per message).
pub const NONCE_LEN: usize = 24;
/// Authentication tag bytes at the end of every sealed message.
pub const TAG_LEN: usize = 16;
/// Bytes a sealed message has beyond its plaintext.
pub const SEAL_OVERHEAD: usize = NONCE_LEN + TAG_LEN;

const AEAD_KEY_CONTEXT: &str = "strata repository 2026 aead key v1";
const HASH_KEY_CONTEXT: &str = "strata repository 2026 block hash key v1";
const INSTANCE_AEAD_KEY_CONTEXT: &str = "strata instance key domain 2026 aead key v1";
const INSTANCE_HASH_KEY_CONTEXT: &str = "strata instance key domain 2026 block hash key v1";
const KEY_FILE_CONTEXT: &str = "strata repository 2026 master key from key file v1";
const WRAP_AAD: &[u8] = b"strata data key v1:";
/// Key files must hold at least this many bytes (ideally random ones).
const MIN_KEY_FILE_LEN: usize = 32;

/// Argon2id cost for new passphrase-wrapped keys: 64 MiB, 3 passes, one lane
/// (above RFC 9106's second recommended option; about 0.2 s on one core).
const ARGON2_M_COST_KIB: u32 = 64 * 1024;
const ARGON2_T_COST: u32 = 3;
const ARGON2_P_COST: u32 = 1;
/// The most memory, passes and lanes a passphrase's key derivation may ask for: sixteen times
/// what Strata writes (the configuration file is outside every seal, so whoever can write the
/// repository could otherwise ask for terabytes or days of work at every opening).
const ARGON2_M_COST_KIB_MAX: u32 = 1024 * 1024;
const ARGON2_T_COST_MAX: u32 = 48;
const ARGON2_P_COST_MAX: u32 = 16;

/// What unlocks a repository's data key.
pub enum KeySource {
    /// A file of at least 32 bytes (e.g. `openssl rand -hex 32 > key`).
    KeyFile(PathBuf),
    /// A passphrase, stretched with Argon2id.
    Passphrase(Zeroizing<String>),
}

impl std::fmt::Debug for KeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeySource::KeyFile(path) => write!(f, "KeyFile({})", path.display()),
            KeySource::Passphrase(_) => f.write_str("Passphrase(..)"),
        }
    }
}

impl KeySource {
    fn kind(&self) -> &'static str {
        match self {
            KeySource::KeyFile(_) => KEY_SOURCE_FILE,
            KeySource::Passphrase(_) => KEY_SOURCE_PASSPHRASE,
        }
    }

    fn describe(&self) -> String {
        match self {
            KeySource::KeyFile(path) => format!("key file {}", path.display()),
            KeySource::Passphrase(_) => "passphrase".into(),
        }
    }
}

const KEY_SOURCE_FILE: &str = "key-file";
const KEY_SOURCE_PASSPHRASE: &str = "passphrase";

/// The `encryption` object of `strata-repo.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EncryptionConfig {
    /// `xchacha20-poly1305`.
    pub cipher: String,
    /// What the master key comes from: `key-file` or `passphrase`.
    pub key_source: String,
    /// Argon2id parameters, for `passphrase`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kdf: Option<KdfParams>,
    /// Hex of nonce (24) | data key sealed under the master key (32 + 16 tag).
    pub wrapped_key: String,
}

/// How a passphrase is stretched into the key that unwraps the data key.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct KdfParams {
    /// `argon2id` (version 0x13).
    pub algorithm: String,
    /// Hex, 16 random bytes.
    pub salt: String,
    /// Argon2 memory cost, KiB.
    pub m_cost_kib: u32,
    /// Argon2 passes.
    pub t_cost: u32,
    /// Argon2 lanes.
    pub p_cost: u32,
}

/// XChaCha20-Poly1305 with a random nonce per message:
/// `nonce (24) | ciphertext | tag (16)`.
#[derive(Clone)]
pub struct Cipher {
    aead: XChaCha20Poly1305,
}

impl Cipher {
    fn new(key: &[u8; 32]) -> Self {
        Cipher {
            aead: XChaCha20Poly1305::new(key.into()),
        }
    }

    /// Encrypts and authenticates `plaintext` bound to `aad` (a random nonce first, the tag last).
    pub fn seal(&self, plaintext: &[u8], aad: &[u8]) -> RepoResult<Vec<u8>> {
        let nonce: [u8; NONCE_LEN] = rand::random();
        let sealed = self
            .aead
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad,
                },
            )
            .map_err(|_| RepoError::Format("message too long to encrypt".into()))?;
        let mut out = Vec::with_capacity(NONCE_LEN + sealed.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    /// The plaintext, or `None` when the message or its `aad` was altered
    /// (or was sealed under another key).
    pub fn open(&self, sealed: &[u8], aad: &[u8]) -> Option<Vec<u8>> {
        if sealed.len() < SEAL_OVERHEAD {
            return None;
        }
        let (nonce, body) = sealed.split_at(NONCE_LEN);
        self.aead
            .decrypt(XNonce::from_slice(nonce), Payload { msg: body, aad })
            .ok()
    }
}

/// Which keys sealed a pack or an object: 0 is the repository's own keys,
/// any other value an instance's key domain (its data key wrapped by a KMS;
/// see docs/REPOSITORY.md, "Instance key domains").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct KeyDomain(pub u32);

impl KeyDomain {
    /// The repository's own keys.
    pub const REPOSITORY: KeyDomain = KeyDomain(0);

    /// A new random instance domain (never [`KeyDomain::REPOSITORY`]).
    pub fn random() -> KeyDomain {
        loop {
            let id: u32 = rand::random();
            if id != 0 {
                return KeyDomain(id);
            }
        }
    }
}

impl std::fmt::Display for KeyDomain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:08x}", self.0)
    }
}

/// The secrets one repository works with: the block hash key always, the
/// cipher (and the data key it came from) when the repository is encrypted.
/// An instance key domain's keys also hold the repository's (`base`), so a
/// reader of that instance opens objects written before the domain existed.
/// Keys may also carry other instance domains' keys for reading only
/// ([`Keys::with_read_domains`]): a repository-wide job (garbage collection,
/// verify, usage) opens every domain it was given with one set of keys.
pub struct Keys {
    pub(crate) hasher: Hasher,
    pub(crate) cipher: Option<Cipher>,
    data_key: Option<Zeroizing<[u8; 32]>>,
    domain: KeyDomain,
    base: Option<Arc<Keys>>,
    read_domains: Vec<Arc<Keys>>,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keys")
            .field("encrypted", &self.cipher.is_some())
            .field("domain", &self.domain)
            .field("read_domains", &self.read_domains())
            .finish_non_exhaustive()
    }
}

impl Keys {
    /// An unencrypted repository: only the hash key.
    pub fn plain(hash_key: [u8; 32]) -> Self {
        Keys {
            hasher: Hasher::new(hash_key),
            cipher: None,
            data_key: None,
            domain: KeyDomain::REPOSITORY,
            base: None,
            read_domains: Vec::new(),
        }
    }

    fn from_data_key(data_key: Zeroizing<[u8; 32]>) -> Self {
        let aead_key = Zeroizing::new(blake3::derive_key(AEAD_KEY_CONTEXT, data_key.as_ref()));
        let hash_key = blake3::derive_key(HASH_KEY_CONTEXT, data_key.as_ref());
        Keys {
            hasher: Hasher::new(hash_key),
            cipher: Some(Cipher::new(&aead_key)),
            data_key: Some(data_key),
            domain: KeyDomain::REPOSITORY,
            base: None,
            read_domains: Vec::new(),
        }
    }

    /// The keys of an instance key domain: AEAD and block hash keys derived
    /// from the instance's data key (unwrapped by the KMS) as the repository's
    /// are from its own, under other contexts. `base` is the repository's.
    pub fn instance_domain(
        domain: KeyDomain,
        data_key: Zeroizing<[u8; 32]>,
        base: Arc<Keys>,
    ) -> RepoResult<Keys> {
        if domain == KeyDomain::REPOSITORY {
            return Err(RepoError::Format(
                "key domain 0 is the repository's own".into(),
            ));
        }
        let base = match &base.base {
            // Always the repository's keys, never another instance's.
            Some(repository) => repository.clone(),
            None if base.read_domains.is_empty() => base,
            None => Arc::new(base.with_read_domains(Vec::new())),
        };
        let aead_key = Zeroizing::new(blake3::derive_key(
            INSTANCE_AEAD_KEY_CONTEXT,
            data_key.as_ref(),
        ));
        let hash_key = blake3::derive_key(INSTANCE_HASH_KEY_CONTEXT, data_key.as_ref());
        Ok(Keys {
            hasher: Hasher::new(hash_key),
            cipher: Some(Cipher::new(&aead_key)),
            data_key: None,
            domain,
            base: Some(base),
            read_domains: Vec::new(),
        })
    }

    /// These keys also reading the domains of `others` (instance domains'
    /// keys, see [`Keys::instance_domain`]); writing is unchanged. Keys of
    /// the repository's domain or of this one in `others` are ignored, and
    /// only `others`' own domain is taken from each (not what they read).
    pub fn with_read_domains(&self, others: Vec<Arc<Keys>>) -> Keys {
        let mut read_domains: Vec<Arc<Keys>> = Vec::new();
        for keys in others {
            let d = keys.domain;
            if d == KeyDomain::REPOSITORY
                || d == self.domain
                || read_domains.iter().any(|k| k.domain == d)
            {
                continue;
            }
            read_domains.push(keys);
        }
        Keys {
            hasher: self.hasher.clone(),
            cipher: self.cipher.clone(),
            data_key: self.data_key.clone(),
            domain: self.domain,
            base: self.base.clone(),
            read_domains,
        }
    }

    /// The keys of read-only domain `domain`, if held.
    pub(crate) fn read_domain(&self, domain: KeyDomain) -> Option<Arc<Keys>> {
        self.read_domains
            .iter()
            .find(|k| k.domain == domain)
            .cloned()
    }

    /// The instance domains these keys read besides their own and the
    /// repository's.
    pub fn read_domains(&self) -> Vec<KeyDomain> {
        self.read_domains.iter().map(|k| k.domain).collect()
    }

    /// The key domain these keys write.
    pub fn domain(&self) -> KeyDomain {
        self.domain
    }

    /// The keys of `domain` among these and the repository's, if held.
    pub(crate) fn for_domain(&self, domain: KeyDomain) -> Option<&Keys> {
        if domain == self.domain {
            return Some(self);
        }
        if let Some(base) = self.base.as_deref().filter(|b| b.domain == domain) {
            return Some(base);
        }
        self.read_domains
            .iter()
            .find(|k| k.domain == domain)
            .map(|k| k.as_ref())
    }

    /// The keys of every domain these read besides their own: the
    /// repository's (in an instance domain), then the read-only domains.
    pub(crate) fn other_domains(&self) -> impl Iterator<Item = &Keys> {
        self.base
            .as_deref()
            .into_iter()
            .chain(self.read_domains.iter().map(|k| k.as_ref()))
    }

    /// The repository's own keys (these, outside an instance domain).
    pub(crate) fn repository_keys(&self) -> &Keys {
        self.base.as_deref().unwrap_or(self)
    }

    /// [`Keys::repository_keys`], shared.
    pub(crate) fn repository_arc(keys: &Arc<Keys>) -> Arc<Keys> {
        keys.base.clone().unwrap_or_else(|| keys.clone())
    }

    /// A new encrypted repository's keys and the config that stores them.
    pub(crate) fn generate(
        source: &KeySource,
        repository_id: &str,
    ) -> RepoResult<(Keys, EncryptionConfig)> {
        let data_key = Zeroizing::new(rand::random::<[u8; 32]>());
        let config = wrap(source, repository_id, &data_key)?;
        Ok((Keys::from_data_key(data_key), config))
    }

    /// Unwraps the data key of an encrypted repository.
    pub(crate) fn unlock(
        source: &KeySource,
        repository_id: &str,
        config: &EncryptionConfig,
    ) -> RepoResult<Keys> {
        if config.cipher != CIPHER_NAME {
            return Err(RepoError::Format(format!(
                "unknown cipher {:?} (this build knows {CIPHER_NAME})",
                config.cipher
            )));
        }
        if config.key_source != source.kind() {
            return Err(RepoError::KeyRequired(format!(
                "repository {repository_id} is unlocked by a {}, not a {}: {}",
                config.key_source.replace('-', " "),
                source.kind().replace('-', " "),
                configure_hint(&config.key_source)
            )));
        }
        let master = master_key(source, config.kdf.as_ref())?;
        let wrapped = hex::decode(&config.wrapped_key).map_err(|e| RepoError::Corrupt {
            object: crate::CONFIG_KEY.into(),
            reason: format!("wrapped_key: {e}"),
        })?;
        let plain = Cipher::new(&master)
            .open(&wrapped, &wrap_aad(repository_id))
            .ok_or_else(|| RepoError::WrongKey {
                what: source.describe(),
                repository: repository_id.to_string(),
            })?;
        let data_key: [u8; 32] = plain
            .as_slice()
            .try_into()
            .map_err(|_| RepoError::Corrupt {
                object: crate::CONFIG_KEY.into(),
                reason: "wrapped data key has the wrong length".into(),
            })?;
        Ok(Keys::from_data_key(Zeroizing::new(data_key)))
    }

    /// The data key wrapped under a new master key (the data key is unchanged).
    pub(crate) fn rewrap(
        &self,
        source: &KeySource,
        repository_id: &str,
    ) -> RepoResult<EncryptionConfig> {
        let data_key = self.data_key.as_ref().ok_or_else(|| {
            RepoError::KeyRequired(format!(
                "repository {repository_id} is not encrypted; there is no key to rotate"
            ))
        })?;
        wrap(source, repository_id, data_key)
    }

    /// True when the repository's objects are sealed.
    pub fn is_encrypted(&self) -> bool {
        self.cipher.is_some()
    }
}

/// What to set for a repository whose key comes from `key_source`.
pub(crate) fn configure_hint(key_source: &str) -> &'static str {
    if key_source == KEY_SOURCE_PASSPHRASE {
        "set encryption.passphrase_env to the variable holding it"
    } else {
        "set encryption.key_file (or STRATA_ENCRYPTION_KEY_FILE)"
    }
}

fn wrap_aad(repository_id: &str) -> Vec<u8> {
    [WRAP_AAD, repository_id.as_bytes()].concat()
}

fn wrap(
    source: &KeySource,
    repository_id: &str,
    data_key: &[u8; 32],
) -> RepoResult<EncryptionConfig> {
    let kdf = match source {
        KeySource::KeyFile(_) => None,
        KeySource::Passphrase(_) => Some(KdfParams {
            algorithm: "argon2id".into(),
            salt: hex::encode(rand::random::<[u8; 16]>()),
            m_cost_kib: ARGON2_M_COST_KIB,
            t_cost: ARGON2_T_COST,
            p_cost: ARGON2_P_COST,
        }),
    };
    let master = master_key(source, kdf.as_ref())?;
    let wrapped = Cipher::new(&master).seal(data_key, &wrap_aad(repository_id))?;
    Ok(EncryptionConfig {
        cipher: CIPHER_NAME.into(),
        key_source: source.kind().into(),
        kdf,
        wrapped_key: hex::encode(wrapped),
    })
}

fn master_key(source: &KeySource, kdf: Option<&KdfParams>) -> RepoResult<Zeroizing<[u8; 32]>> {
    match source {
        KeySource::KeyFile(path) => {
            let bytes = Zeroizing::new(std::fs::read(path).map_err(|e| {
                RepoError::KeyRequired(format!(
                    "cannot read encryption key file {}: {e}",
                    path.display()
                ))
            })?);
            let text = bytes.trim_ascii_end();
            if text.len() < MIN_KEY_FILE_LEN {
                return Err(RepoError::KeyRequired(format!(
                    "encryption key file {} holds {} bytes; it needs at least {MIN_KEY_FILE_LEN} (e.g. openssl rand -hex 32)",
                    path.display(),
                    text.len()
                )));
            }
            Ok(Zeroizing::new(blake3::derive_key(KEY_FILE_CONTEXT, text)))
        }
        KeySource::Passphrase(passphrase) => {
            if passphrase.is_empty() {
                return Err(RepoError::KeyRequired(
                    "the encryption passphrase is empty".into(),
                ));
            }
            let params = kdf.ok_or_else(|| RepoError::Corrupt {
                object: crate::CONFIG_KEY.into(),
                reason: "passphrase-wrapped key without kdf parameters".into(),
            })?;
            if params.algorithm != "argon2id" {
                return Err(RepoError::Format(format!(
                    "unknown key derivation {:?}",
                    params.algorithm
                )));
            }
            let salt = hex::decode(&params.salt).map_err(|e| RepoError::Corrupt {
                object: crate::CONFIG_KEY.into(),
                reason: format!("kdf salt: {e}"),
            })?;
            check_kdf_costs(params).map_err(|why| RepoError::Corrupt {
                object: crate::CONFIG_KEY.into(),
                reason: why,
            })?;
            let argon =
                argon2::Params::new(params.m_cost_kib, params.t_cost, params.p_cost, Some(32))
                    .map_err(|e| RepoError::Corrupt {
                        object: crate::CONFIG_KEY.into(),
                        reason: format!("kdf parameters: {e}"),
                    })?;
            let mut out = Zeroizing::new([0u8; 32]);
            argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, argon)
                .hash_password_into(passphrase.as_bytes(), &salt, out.as_mut())
                .map_err(|e| RepoError::Format(format!("argon2id: {e}")))?;
            Ok(out)
        }
    }
}

/// Refuses key derivation costs past the maxima above.
fn check_kdf_costs(params: &KdfParams) -> Result<(), String> {
    if params.m_cost_kib > ARGON2_M_COST_KIB_MAX
        || params.t_cost > ARGON2_T_COST_MAX
        || params.p_cost > ARGON2_P_COST_MAX
    {
        return Err(format!(
            "kdf parameters m_cost_kib {}, t_cost {}, p_cost {} ask for more than {}, {}, {}",
            params.m_cost_kib,
            params.t_cost,
            params.p_cost,
            ARGON2_M_COST_KIB_MAX,
            ARGON2_T_COST_MAX,
            ARGON2_P_COST_MAX
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_derivation_costs_past_the_maxima_are_refused() {
        let params = |m, t, p| KdfParams {
            algorithm: "argon2id".into(),
            salt: "00".repeat(16),
            m_cost_kib: m,
            t_cost: t,
            p_cost: p,
        };
        let written = params(ARGON2_M_COST_KIB, ARGON2_T_COST, ARGON2_P_COST);
        assert_eq!(check_kdf_costs(&written), Ok(()));
        for hostile in [
            params(u32::MAX, ARGON2_T_COST, ARGON2_P_COST),
            params(ARGON2_M_COST_KIB, u32::MAX, ARGON2_P_COST),
            params(ARGON2_M_COST_KIB, ARGON2_T_COST, 1000),
        ] {
            let why = check_kdf_costs(&hostile).unwrap_err();
            assert!(why.contains("ask for more than"), "{why}");
        }
    }

    fn key_file(dir: &std::path::Path, name: &str, content: &str) -> KeySource {
        let path = dir.join(name);
        std::fs::write(&path, content).unwrap();
        KeySource::KeyFile(path)
    }

    #[test]
    fn seal_open_and_tamper() {
        let c = Cipher::new(&[9; 32]);
        let sealed = c.seal(b"secret block", b"aad").unwrap();
        assert_eq!(sealed.len(), 12 + SEAL_OVERHEAD);
        assert!(!sealed.windows(6).any(|w| w == b"secret"));
        assert_eq!(c.open(&sealed, b"aad").unwrap(), b"secret block");
        assert!(c.open(&sealed, b"other aad").is_none());
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 1;
            assert!(c.open(&bad, b"aad").is_none(), "flip at {i}");
        }
        assert!(Cipher::new(&[8; 32]).open(&sealed, b"aad").is_none());
        // Random nonces: sealing twice never gives the same bytes.
        assert_ne!(sealed, c.seal(b"secret block", b"aad").unwrap());
    }

    #[test]
    fn wrap_unlock_rotate_and_wrong_keys() {
        let dir = tempfile::tempdir().unwrap();
        let a = key_file(dir.path(), "a", &"a".repeat(64));
        let b = key_file(dir.path(), "b", &"b".repeat(64));
        let (keys, config) = Keys::generate(&a, "repo1").unwrap();
        assert!(config.kdf.is_none());
        let again = Keys::unlock(&a, "repo1", &config).unwrap();
        assert_eq!(
            again.hasher.hash(b"x").0,
            keys.hasher.hash(b"x").0,
            "same data key, same hash key"
        );
        let err = Keys::unlock(&b, "repo1", &config).unwrap_err();
        assert!(matches!(err, RepoError::WrongKey { .. }), "{err}");
        assert!(err.to_string().contains("does not unlock"), "{err}");
        // The wrapped key is bound to its repository.
        assert!(matches!(
            Keys::unlock(&a, "repo2", &config),
            Err(RepoError::WrongKey { .. })
        ));

        let pass = KeySource::Passphrase(Zeroizing::new("correct horse".into()));
        let rotated = keys.rewrap(&pass, "repo1").unwrap();
        assert!(rotated.kdf.is_some());
        let unlocked = Keys::unlock(&pass, "repo1", &rotated).unwrap();
        assert_eq!(unlocked.hasher.hash(b"x").0, keys.hasher.hash(b"x").0);
        let wrong = KeySource::Passphrase(Zeroizing::new("correct horse!".into()));
        assert!(matches!(
            Keys::unlock(&wrong, "repo1", &rotated),
            Err(RepoError::WrongKey { .. })
        ));
        let err = Keys::unlock(&a, "repo1", &rotated).unwrap_err();
        assert!(err.to_string().contains("passphrase"), "{err}");
    }

    #[test]
    fn short_or_missing_key_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let short = key_file(dir.path(), "short", "tooshort\n");
        let err = Keys::generate(&short, "r").unwrap_err();
        assert!(err.to_string().contains("at least 32"), "{err}");
        let missing = KeySource::KeyFile(dir.path().join("nope"));
        let err = Keys::generate(&missing, "r").unwrap_err();
        assert!(err.to_string().contains("cannot read"), "{err}");
    }

    #[test]
    fn hash_keys_differ_between_repositories() {
        let dir = tempfile::tempdir().unwrap();
        let k = key_file(dir.path(), "k", &"k".repeat(40));
        let (one, _) = Keys::generate(&k, "r").unwrap();
        let (two, _) = Keys::generate(&k, "r").unwrap();
        assert_ne!(
            one.hasher.hash(b"same block").0,
            two.hasher.hash(b"same block").0
        );
    }
}
