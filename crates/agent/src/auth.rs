//! The agent's credential and the signature every request carries.
//!
//! The credential is 32 random bytes, kept hex-encoded in a key file of mode 0600 that the
//! agent writes on first start and the Strata server is given. A request is signed with
//! HMAC-SHA256 under that key over
//!
//! ```text
//! STRATA-AGENT-HMAC-SHA256\n<METHOD>\n<path>\n<query>\n<unix seconds>\n<nonce>\n<hex sha256 of body>
//! ```
//!
//! sent as the headers `x-strata-timestamp`, `x-strata-nonce`, `x-strata-content-sha256` and
//! `authorization: Strata-HMAC-SHA256 <hex signature>`. The agent refuses a request whose
//! signature does not verify, whose body does not hash to the signed hash, whose time is more
//! than five minutes off, or whose nonce it has already seen within that window (a replay);
//! nonces are remembered only after the signature verified, so unsigned traffic cannot fill
//! the memory. A request signed before the agent started, or not after the latest one its
//! previous run accepted (kept in a file), is refused too: its nonce may have been seen by that
//! run, whose memory is gone (see [`Verifier::recording`]).
//!
//! Every answer is sealed the same way, so nothing between the agent and the Strata server
//! can forge or alter one: HMAC-SHA256 under the key over
//!
//! ```text
//! STRATA-AGENT-RESPONSE-HMAC-SHA256\n<status>\n<the request's nonce>\n<hex sha256 of body>
//! ```
//!
//! sent as `x-strata-response-mac: <hex>`, in the headers of an answer held in memory and in
//! the trailers of a streamed one (a file range). The client refuses an answer whose MAC is
//! missing or does not verify; binding the request's nonce stops an old answer being replayed
//! for a new request.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};

/// Header: the request's time, Unix seconds.
pub const HEADER_TIMESTAMP: &str = "x-strata-timestamp";
/// Header: 32 lowercase hex characters, never reused.
pub const HEADER_NONCE: &str = "x-strata-nonce";
/// Header: hex SHA-256 of the request body.
pub const HEADER_CONTENT_SHA256: &str = "x-strata-content-sha256";
/// Header (or trailer, for a streamed answer): the agent's MAC of its answer.
pub const HEADER_RESPONSE_MAC: &str = "x-strata-response-mac";
/// The `authorization` scheme.
pub const AUTH_SCHEME: &str = "Strata-HMAC-SHA256";
/// Largest accepted difference between a request's time and the agent's clock, seconds.
pub const MAX_SKEW_SECS: i64 = 300;
/// Nonces remembered at most; beyond this requests are refused until old ones expire.
const MAX_NONCES: usize = 1_000_000;

/// Why a key file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Reading or writing it failed.
    #[error("key file {}: {source}", path.display())]
    Io {
        /// The key file.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// Group or others may read it.
    #[error("key file {} is readable by group or others (mode {mode:04o}); run chmod 600 {}", path.display(), path.display())]
    Permissions {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// It does not hold 64 hex characters.
    #[error("key file {} does not hold a key (64 hex characters)", path.display())]
    Malformed {
        /// The key file.
        path: PathBuf,
    },
}

/// The 32-byte credential shared by the agent and the Strata server.
#[derive(Clone, PartialEq, Eq)]
pub struct AgentKey([u8; 32]);

impl std::fmt::Debug for AgentKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AgentKey(..)")
    }
}

impl AgentKey {
    /// A fresh random key.
    pub fn generate() -> AgentKey {
        AgentKey(rand::random())
    }

    /// From its 64 hex characters (surrounding whitespace ignored).
    pub fn from_hex(text: &str) -> Option<AgentKey> {
        let bytes = hex::decode(text.trim()).ok()?;
        Some(AgentKey(bytes.try_into().ok()?))
    }

    /// Its 64 hex characters.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Reads a key file, refusing one that group or others may read.
    pub fn load(path: &Path) -> Result<AgentKey, KeyError> {
        let io = |source| KeyError::Io {
            path: path.to_path_buf(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(io)?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyError::Permissions {
                path: path.to_path_buf(),
                mode,
            });
        }
        let text = std::fs::read_to_string(path).map_err(io)?;
        AgentKey::from_hex(&text).ok_or_else(|| KeyError::Malformed {
            path: path.to_path_buf(),
        })
    }

    /// Reads the key file, or creates it (mode 0600, a new random key) when it does not exist.
    /// Returns the key and whether it was created.
    pub fn load_or_create(path: &Path) -> Result<(AgentKey, bool), KeyError> {
        let key = AgentKey::generate();
        let created = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path);
        match created {
            Ok(mut f) => {
                let io = |source| KeyError::Io {
                    path: path.to_path_buf(),
                    source,
                };
                f.set_permissions(std::fs::Permissions::from_mode(0o600))
                    .map_err(io)?;
                writeln!(f, "{}", key.to_hex())
                    .and_then(|()| f.sync_all())
                    .map_err(io)?;
                Ok((key, true))
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                Ok((AgentKey::load(path)?, false))
            }
            Err(source) => Err(KeyError::Io {
                path: path.to_path_buf(),
                source,
            }),
        }
    }
}

/// The signature headers of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedHeaders {
    /// `x-strata-timestamp`.
    pub timestamp: i64,
    /// `x-strata-nonce`.
    pub nonce: String,
    /// `x-strata-content-sha256`.
    pub content_sha256: String,
    /// `authorization`.
    pub authorization: String,
}

impl SignedHeaders {
    /// The headers as (name, value) pairs.
    pub fn pairs(&self) -> [(&'static str, String); 4] {
        [
            (HEADER_TIMESTAMP, self.timestamp.to_string()),
            (HEADER_NONCE, self.nonce.clone()),
            (HEADER_CONTENT_SHA256, self.content_sha256.clone()),
            ("authorization", self.authorization.clone()),
        ]
    }
}

/// A fresh nonce: 16 random bytes as 32 lowercase hex characters.
pub fn new_nonce() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

/// The current time, Unix seconds.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn string_to_sign(
    method: &str,
    path: &str,
    query: &str,
    timestamp: i64,
    nonce: &str,
    body_hash: &str,
) -> String {
    format!(
        "STRATA-AGENT-HMAC-SHA256\n{method}\n{path}\n{query}\n{timestamp}\n{nonce}\n{body_hash}"
    )
}

fn mac(key: &AgentKey, text: &str) -> Hmac<Sha256> {
    let mut mac =
        <Hmac<Sha256> as KeyInit>::new_from_slice(&key.0).expect("HMAC takes keys of any length");
    mac.update(text.as_bytes());
    mac
}

/// Signs a request: `method` (upper case), the URI's `path` and raw `query` (empty when
/// none) exactly as sent, its `body`, at `timestamp` with `nonce`.
pub fn sign(
    key: &AgentKey,
    method: &str,
    path: &str,
    query: &str,
    body: &[u8],
    timestamp: i64,
    nonce: &str,
) -> SignedHeaders {
    let content_sha256 = hex::encode(Sha256::digest(body));
    let text = string_to_sign(method, path, query, timestamp, nonce, &content_sha256);
    let signature = hex::encode(mac(key, &text).finalize().into_bytes());
    SignedHeaders {
        timestamp,
        nonce: nonce.to_string(),
        content_sha256,
        authorization: format!("{AUTH_SCHEME} {signature}"),
    }
}

/// The MAC of one answer, computed as its body goes by: the agent seals what it sends, the
/// client checks what it received.
pub struct ResponseSeal {
    mac: Hmac<Sha256>,
    nonce: String,
    body: Sha256,
}

impl std::fmt::Debug for ResponseSeal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseSeal")
            .field("nonce", &self.nonce)
            .finish_non_exhaustive()
    }
}

impl ResponseSeal {
    /// A seal for the answer to the request that carried `nonce`.
    pub fn new(key: &AgentKey, nonce: &str) -> ResponseSeal {
        ResponseSeal {
            mac: mac(key, ""),
            nonce: nonce.to_string(),
            body: Sha256::new(),
        }
    }

    /// Adds the next bytes of the body.
    pub fn update(&mut self, bytes: &[u8]) {
        self.body.update(bytes);
    }

    fn finish(self, status: u16) -> Hmac<Sha256> {
        let body_hash = hex::encode(self.body.finalize());
        let mut mac = self.mac;
        mac.update(
            format!(
                "STRATA-AGENT-RESPONSE-HMAC-SHA256\n{status}\n{}\n{body_hash}",
                self.nonce
            )
            .as_bytes(),
        );
        mac
    }

    /// The MAC (hex) of an answer with `status` and the body seen so far.
    pub fn seal(self, status: u16) -> String {
        hex::encode(self.finish(status).finalize().into_bytes())
    }

    /// Checks the `claimed` MAC of an answer with `status` and the body seen so far.
    pub fn verify(self, status: u16, claimed: Option<&str>) -> Result<(), AuthRefusal> {
        let Some(claimed) = claimed else {
            return Err(AuthRefusal(format!(
                "the answer carries no {HEADER_RESPONSE_MAC}; it does not come from an agent holding the key"
            )));
        };
        let claimed = hex::decode(claimed.trim())
            .map_err(|_| AuthRefusal(format!("the answer's {HEADER_RESPONSE_MAC} is not hex")))?;
        self.finish(status).verify_slice(&claimed).map_err(|_| {
            AuthRefusal(
                "the answer's MAC does not verify: altered on the way, or not from an agent holding the key"
                    .into(),
            )
        })
    }
}

/// A request the agent refuses to authenticate, with a one-line reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct AuthRefusal(pub String);

/// Checks request signatures and remembers nonces (one per agent).
#[derive(Debug)]
pub struct Verifier {
    key: AgentKey,
    seen: Mutex<Nonces>,
    not_before: i64,
    record: Option<LatestRequest>,
}

/// Nonces of the requests accepted within the replay window, by their request time.
#[derive(Debug, Default)]
struct Nonces {
    by_nonce: HashMap<String, i64>,
    /// Nonces of requests signed before this time have been forgotten: such requests are
    /// refused, or a clock stepped back would let a forgotten one be replayed.
    forgotten_before: i64,
}

/// The latest request time the agent accepted, kept in a file so that the next run of the
/// agent accepts only requests signed after it: a client whose clock runs ahead of the
/// agent's signs requests dated after the agent's restart, and their nonces are forgotten.
#[derive(Debug)]
struct LatestRequest {
    path: PathBuf,
    latest: Mutex<i64>,
}

impl LatestRequest {
    /// Records `timestamp` if it is the latest yet (at most one write a second).
    fn note(&self, timestamp: i64) -> std::io::Result<()> {
        let mut latest = self.latest.lock().unwrap_or_else(|p| p.into_inner());
        if timestamp <= *latest {
            return Ok(());
        }
        // Written aside and renamed, so a crash leaves the old time or the new, never half.
        let tmp = self.path.with_extension("tmp");
        std::fs::write(&tmp, format!("{timestamp}\n"))?;
        std::fs::rename(&tmp, &self.path)?;
        *latest = timestamp;
        Ok(())
    }
}

impl Verifier {
    /// A verifier for `key` accepting requests signed at `not_before` (Unix seconds) or later.
    /// The agent passes the first whole second after it started: the nonces of requests signed
    /// earlier may have been accepted by its previous run, whose memory of them is gone, so a
    /// request recorded then cannot be replayed after a restart. A client whose clock is behind
    /// signs again with the time the refusal names.
    pub fn new(key: AgentKey, not_before: i64) -> Verifier {
        Verifier {
            key,
            seen: Mutex::new(Nonces::default()),
            not_before,
            record: None,
        }
    }

    /// [`new`](Self::new), also keeping the latest accepted request time in the file `path`
    /// and accepting only requests signed after the time it already holds: what a previous
    /// run accepted stays refused even from a client whose clock is ahead.
    pub fn recording(
        key: AgentKey,
        not_before: i64,
        path: PathBuf,
    ) -> Result<Verifier, std::io::Error> {
        let latest = match std::fs::read_to_string(&path) {
            Ok(text) => text.trim().parse::<i64>().map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!(
                        "{} does not hold a time (Unix seconds); remove it to start over",
                        path.display()
                    ),
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(e),
        };
        let mut verifier = Verifier::new(key, not_before.max(latest.saturating_add(1)));
        verifier.record = Some(LatestRequest {
            path,
            latest: Mutex::new(latest),
        });
        Ok(verifier)
    }

    /// The earliest request time accepted, Unix seconds.
    pub fn not_before(&self) -> i64 {
        self.not_before
    }

    /// A seal for the answer to the request that carried `nonce`.
    pub fn seal(&self, nonce: &str) -> ResponseSeal {
        ResponseSeal::new(&self.key, nonce)
    }

    /// Verifies a request at time `now`. `header` looks a header up by lower-case name.
    pub fn verify<'h>(
        &self,
        method: &str,
        path: &str,
        query: &str,
        header: impl Fn(&str) -> Option<&'h str>,
        body: &[u8],
        now: i64,
    ) -> Result<(), AuthRefusal> {
        let refuse = |m: &str| Err(AuthRefusal(m.to_string()));
        let (nonce, timestamp, claimed_hash) =
            self.check_head(method, path, query, &header, now)?;
        if !hex::encode(Sha256::digest(body)).eq_ignore_ascii_case(claimed_hash) {
            return refuse("body does not match its signed hash");
        }
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        // Only nonces too old to pass the clock check again are forgotten, and the time they
        // go back to is remembered: a request signed before it may be one of them.
        let horizon = now - MAX_SKEW_SECS;
        if horizon > seen.forgotten_before {
            seen.by_nonce.retain(|_, t| *t >= horizon);
            seen.forgotten_before = horizon;
        }
        if timestamp < seen.forgotten_before {
            return Err(AuthRefusal(format!(
                "request signed at {timestamp}, before {} (the agent's clock has stepped back since it saw later requests); sign it again",
                seen.forgotten_before
            )));
        }
        if seen.by_nonce.contains_key(nonce) {
            return refuse("replayed request: nonce already used");
        }
        if seen.by_nonce.len() >= MAX_NONCES {
            return refuse("too many requests within the replay window; retry later");
        }
        seen.by_nonce.insert(nonce.to_string(), timestamp);
        drop(seen);
        if let Some(record) = &self.record {
            record.note(timestamp).map_err(|e| {
                AuthRefusal(format!(
                    "the agent cannot record the request's time in {}: {e}",
                    record.path.display()
                ))
            })?;
        }
        Ok(())
    }

    /// Checks everything but the body and the nonce: the signature over the claimed body hash
    /// and the clock. The agent runs it before reading a large body (a WAL segment), so an
    /// unsigned request cannot make it buffer one; [`verify`](Self::verify) follows.
    pub fn verify_head<'h>(
        &self,
        method: &str,
        path: &str,
        query: &str,
        header: impl Fn(&str) -> Option<&'h str>,
        now: i64,
    ) -> Result<(), AuthRefusal> {
        self.check_head(method, path, query, &header, now)
            .map(|_| ())
    }

    /// (nonce, timestamp, claimed body hash) of a request whose signature and time are right.
    fn check_head<'h>(
        &self,
        method: &str,
        path: &str,
        query: &str,
        header: &impl Fn(&str) -> Option<&'h str>,
        now: i64,
    ) -> Result<(&'h str, i64, &'h str), AuthRefusal> {
        let refuse = |m: &str| Err(AuthRefusal(m.to_string()));
        let Some(auth) = header("authorization") else {
            return refuse("unsigned request: no authorization header");
        };
        let Some(signature) = auth
            .strip_prefix(AUTH_SCHEME)
            .and_then(|s| s.strip_prefix(' '))
        else {
            return refuse("authorization is not Strata-HMAC-SHA256");
        };
        let Ok(signature) = hex::decode(signature.trim()) else {
            return refuse("signature is not hex");
        };
        let Some(timestamp) = header(HEADER_TIMESTAMP).and_then(|t| t.parse::<i64>().ok()) else {
            return refuse("missing or malformed x-strata-timestamp");
        };
        let Some(nonce) = header(HEADER_NONCE)
            .filter(|n| n.len() == 32 && n.bytes().all(|b| b.is_ascii_hexdigit()))
        else {
            return refuse("missing or malformed x-strata-nonce (32 hex characters)");
        };
        let Some(claimed_hash) = header(HEADER_CONTENT_SHA256) else {
            return refuse("missing x-strata-content-sha256");
        };
        let text = string_to_sign(method, path, query, timestamp, nonce, claimed_hash);
        if mac(&self.key, &text).verify_slice(&signature).is_err() {
            return refuse("signature does not match (wrong key?)");
        }
        if (now - timestamp).abs() > MAX_SKEW_SECS {
            return Err(AuthRefusal(format!(
                "request time {timestamp} is {}s away from the agent's clock (at most {MAX_SKEW_SECS}s)",
                (now - timestamp).abs()
            )));
        }
        if timestamp < self.not_before {
            return Err(AuthRefusal(format!(
                "request signed at {timestamp}, before the agent started (it accepts requests signed from {} on, after any it accepted before); sign it again",
                self.not_before
            )));
        }
        Ok((nonce, timestamp, claimed_hash))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verify(
        v: &Verifier,
        h: &SignedHeaders,
        method: &str,
        path: &str,
        query: &str,
        body: &[u8],
        now: i64,
    ) -> Result<(), AuthRefusal> {
        let map: HashMap<&str, String> = h.pairs().into_iter().collect();
        v.verify(
            method,
            path,
            query,
            |n| map.get(n).map(String::as_str),
            body,
            now,
        )
    }

    #[test]
    fn a_signed_request_verifies_once() {
        let key = AgentKey::generate();
        let v = Verifier::new(key.clone(), 0);
        let h = sign(
            &key,
            "POST",
            "/v1/snapshots/a",
            "x=1",
            b"{}",
            1000,
            &new_nonce(),
        );
        assert_eq!(
            verify(&v, &h, "POST", "/v1/snapshots/a", "x=1", b"{}", 1000),
            Ok(())
        );
        let again = verify(&v, &h, "POST", "/v1/snapshots/a", "x=1", b"{}", 1001).unwrap_err();
        assert!(again.0.contains("replayed"), "{again}");
    }

    #[test]
    fn a_clock_stepped_back_does_not_reopen_the_replay_window() {
        let key = AgentKey::generate();
        let v = Verifier::new(key.clone(), 0);
        let at = |t: i64| sign(&key, "GET", "/v1/facts", "", b"", t, &new_nonce());
        let first = at(1000);
        assert_eq!(
            verify(&v, &first, "GET", "/v1/facts", "", b"", 1000),
            Ok(())
        );
        // The clock steps far back: a request of that time is refused rather than taken
        // (taking it would forget the nonce above)...
        let early = at(600);
        let err = verify(&v, &early, "GET", "/v1/facts", "", b"", 600).unwrap_err();
        assert!(err.0.contains("stepped back"), "{err}");
        // ...and when the clock comes forward again, the first request is still a replay.
        let again = verify(&v, &first, "GET", "/v1/facts", "", b"", 1000).unwrap_err();
        assert!(again.0.contains("replayed"), "{again}");
        // Requests of the present are taken, and nonces expire as the clock moves on.
        assert_eq!(
            verify(&v, &at(1010), "GET", "/v1/facts", "", b"", 1010),
            Ok(())
        );
        let late = 1000 + MAX_SKEW_SECS + 1;
        assert_eq!(
            verify(&v, &at(late), "GET", "/v1/facts", "", b"", late),
            Ok(())
        );
        assert!(!v.seen.lock().unwrap().by_nonce.values().any(|t| *t == 1000));
    }

    #[test]
    fn every_signed_part_is_bound() {
        let key = AgentKey::generate();
        let v = Verifier::new(key.clone(), 0);
        let h = sign(
            &key,
            "POST",
            "/v1/snapshots/a",
            "x=1",
            b"{}",
            1000,
            &new_nonce(),
        );
        for (method, path, query, body) in [
            ("DELETE", "/v1/snapshots/a", "x=1", &b"{}"[..]),
            ("POST", "/v1/snapshots/b", "x=1", b"{}"),
            ("POST", "/v1/snapshots/a", "x=2", b"{}"),
        ] {
            let e = verify(&v, &h, method, path, query, body, 1000).unwrap_err();
            assert!(e.0.contains("signature does not match"), "{e}");
        }
        let e = verify(&v, &h, "POST", "/v1/snapshots/a", "x=1", b"{\"a\":1}", 1000).unwrap_err();
        assert!(e.0.contains("body does not match"), "{e}");
        let other = Verifier::new(AgentKey::generate(), 0);
        let e = verify(&other, &h, "POST", "/v1/snapshots/a", "x=1", b"{}", 1000).unwrap_err();
        assert!(e.0.contains("wrong key"), "{e}");
    }

    #[test]
    fn stale_and_future_requests_are_refused() {
        let key = AgentKey::generate();
        let v = Verifier::new(key.clone(), 0);
        for now in [1000 + MAX_SKEW_SECS + 1, 1000 - MAX_SKEW_SECS - 1] {
            let h = sign(&key, "GET", "/v1/facts", "", b"", 1000, &new_nonce());
            let e = verify(&v, &h, "GET", "/v1/facts", "", b"", now).unwrap_err();
            assert!(e.0.contains("away from the agent's clock"), "{e}");
        }
        let h = sign(&key, "GET", "/v1/facts", "", b"", 1000, &new_nonce());
        assert_eq!(
            verify(&v, &h, "GET", "/v1/facts", "", b"", 1000 + MAX_SKEW_SECS),
            Ok(())
        );
    }

    #[test]
    fn requests_signed_before_the_agent_started_are_refused() {
        let key = AgentKey::generate();
        let v = Verifier::new(key.clone(), 1000);
        let h = sign(&key, "GET", "/v1/facts", "", b"", 999, &new_nonce());
        let e = verify(&v, &h, "GET", "/v1/facts", "", b"", 1000).unwrap_err();
        assert!(e.0.contains("before the agent started"), "{e}");
        let h = sign(&key, "GET", "/v1/facts", "", b"", 1000, &new_nonce());
        assert_eq!(verify(&v, &h, "GET", "/v1/facts", "", b"", 999), Ok(()));
    }

    #[test]
    fn a_restarted_verifier_refuses_what_the_previous_one_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("latest");
        let key = AgentKey::generate();
        let first = Verifier::recording(key.clone(), 1000, path.clone()).unwrap();
        // A client whose clock runs a minute ahead.
        let ahead = sign(&key, "GET", "/v1/facts", "", b"", 1060, &new_nonce());
        assert_eq!(
            verify(&first, &ahead, "GET", "/v1/facts", "", b"", 1000),
            Ok(())
        );
        let older = sign(&key, "GET", "/v1/facts", "", b"", 1010, &new_nonce());
        assert_eq!(
            verify(&first, &older, "GET", "/v1/facts", "", b"", 1000),
            Ok(())
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "1060\n");
        // Restarted ten seconds later.
        let second = Verifier::recording(key.clone(), 1010, path.clone()).unwrap();
        assert_eq!(second.not_before(), 1061);
        let e = verify(&second, &ahead, "GET", "/v1/facts", "", b"", 1010).unwrap_err();
        assert!(e.0.contains("before the agent started"), "{e}");
        let fresh = sign(&key, "GET", "/v1/facts", "", b"", 1061, &new_nonce());
        assert_eq!(
            verify(&second, &fresh, "GET", "/v1/facts", "", b"", 1010),
            Ok(())
        );
        std::fs::write(&path, "yesterday").unwrap();
        let e = Verifier::recording(key, 0, path).unwrap_err();
        assert!(e.to_string().contains("does not hold a time"), "{e}");
    }

    #[test]
    fn unsigned_and_malformed_requests_are_refused() {
        let v = Verifier::new(AgentKey::generate(), 0);
        let e = v
            .verify("GET", "/v1/facts", "", |_| None, b"", 0)
            .unwrap_err();
        assert_eq!(e.0, "unsigned request: no authorization header");
        let e = v
            .verify(
                "GET",
                "/v1/facts",
                "",
                |n| (n == "authorization").then_some("Bearer x"),
                b"",
                0,
            )
            .unwrap_err();
        assert!(e.0.contains("not Strata-HMAC-SHA256"), "{e}");
    }

    #[test]
    fn an_answer_seal_binds_status_body_nonce_and_key() {
        let key = AgentKey::generate();
        let nonce = new_nonce();
        let sealed = |status: u16, body: &[u8], nonce: &str, key: &AgentKey| {
            let mut s = ResponseSeal::new(key, nonce);
            s.update(body);
            s.seal(status)
        };
        let mac = sealed(200, b"{}", &nonce, &key);
        let check = |status: u16, body: &[u8], nonce: &str| {
            let mut s = ResponseSeal::new(&key, nonce);
            s.update(body);
            s.verify(status, Some(&mac))
        };
        assert_eq!(check(200, b"{}", &nonce), Ok(()));
        assert!(check(201, b"{}", &nonce).is_err());
        assert!(check(200, b"{ }", &nonce).is_err());
        assert!(check(200, b"{}", &new_nonce()).is_err());
        assert_ne!(mac, sealed(200, b"{}", &nonce, &AgentKey::generate()));
        let e = ResponseSeal::new(&key, &nonce)
            .verify(200, None)
            .unwrap_err();
        assert!(e.0.contains("carries no x-strata-response-mac"), "{e}");
    }

    #[test]
    fn key_files_are_private_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.key");
        let (key, created) = AgentKey::load_or_create(&path).unwrap();
        assert!(created);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let (again, created) = AgentKey::load_or_create(&path).unwrap();
        assert!(!created);
        assert_eq!(key, again);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = AgentKey::load_or_create(&path).unwrap_err();
        assert!(
            matches!(e, KeyError::Permissions { mode: 0o644, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("readable by group or others"), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&path, "not a key").unwrap();
        assert!(matches!(
            AgentKey::load(&path),
            Err(KeyError::Malformed { .. })
        ));
    }
}
