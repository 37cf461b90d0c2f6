//! Console sessions. Signing in checks an AccessKey pair against the
//! catalog; the session then lives in the catalog (so every node behind a
//! load balancer knows it) under an opaque random id carried by an
//! `HttpOnly`, `SameSite=Strict` cookie scoped to `/console`. The catalog
//! keeps only the id's SHA-256: reading the catalog signs nobody in. A
//! session ends after [`IDLE`] without requests, [`LIFETIME`] after sign-in,
//! at sign-out, or when its key is deleted. Each session has its own CSRF
//! token that every form and state-changing request must return.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use strata_catalog::{CatalogResult, ConsoleSession};

use axum::http::HeaderMap;
use strata_api::Principal;
use strata_catalog::Catalog;
use subtle::ConstantTimeEq;

/// Cookie holding the session id.
pub const SESSION_COOKIE: &str = "strata_session";
/// Cookie holding the sign-in form's CSRF token (there is no session yet).
pub const SIGNIN_COOKIE: &str = "strata_signin";
/// A session ends after this long without a request…
pub const IDLE: Duration = Duration::from_secs(30 * 60);
/// …and this long after sign-in in any case.
pub const LIFETIME: Duration = Duration::from_secs(12 * 3600);

/// A one-time message shown on the next page (after a redirect).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Flash {
    /// Something happened; `link` is (href, label) of where to follow it.
    Done {
        text: String,
        link: Option<(String, String)>,
    },
    Failed {
        text: String,
        code: String,
    },
}

/// Who is signed in, as a request sees it.
#[derive(Debug, Clone)]
pub struct Signed {
    pub id: String,
    pub key_id: String,
    pub read_only: bool,
    pub csrf: String,
}

impl Signed {
    /// The principal the API's actions run as.
    pub fn principal(&self) -> Principal {
        Principal {
            access_key_id: self.key_id.clone(),
            read_only: self.read_only,
        }
    }

    pub fn csrf_matches(&self, token: &str) -> bool {
        same(&self.csrf, token)
    }
}

/// The console's sessions, kept in the catalog.
#[derive(Default)]
pub struct Sessions;

/// What the catalog keys a session by: the SHA-256 of its id, hex.
fn id_hash(id: &str) -> String {
    hex::encode(Sha256::digest(id.as_bytes()))
}

/// 32 random bytes from the thread-local CSPRNG, hex-encoded.
pub fn random_token() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

/// Constant-time string comparison (tokens, secrets).
pub fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

/// The value of cookie `name` in the request's `Cookie` headers.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// A `Set-Cookie` value for the console's cookies.
pub fn set_cookie(name: &str, value: &str, max_age: Duration, secure: bool) -> String {
    format!(
        "{name}={value}; Path=/console; HttpOnly; SameSite=Strict; Max-Age={}{}",
        max_age.as_secs(),
        if secure { "; Secure" } else { "" }
    )
}

/// Checks an AccessKey pair; `None` when the id is unknown or the secret
/// does not match (the caller does not learn which).
pub fn check_key_pair(catalog: &dyn Catalog, id: &str, secret: &str) -> Option<Principal> {
    let key = catalog.get_access_key(id.trim()).ok().flatten()?;
    same(&key.secret, secret.trim()).then_some(Principal {
        access_key_id: key.id,
        read_only: key.read_only,
    })
}

impl Sessions {
    /// Starts a session for `principal`; returns its id (the cookie's value).
    pub fn create(&self, principal: &Principal, catalog: &dyn Catalog) -> CatalogResult<String> {
        // The catalog's clock, which every node judges sessions by.
        let now = catalog.now()?;
        let id = random_token();
        let session = ConsoleSession {
            id_hash: id_hash(&id),
            key_id: principal.access_key_id.clone(),
            read_only: principal.read_only,
            csrf: random_token(),
            created_at: now,
            last_seen_at: now,
            flash: None,
        };
        catalog.put_session(&session, now - chrono_duration(IDLE))?;
        Ok(id)
    }

    /// The live session the request's cookie names, if any. Its key must
    /// still exist: deleting a key signs its sessions out. A catalog that
    /// cannot answer counts as no session (the user is asked to sign in).
    pub fn get(&self, headers: &HeaderMap, catalog: &dyn Catalog) -> Option<Signed> {
        let id = cookie(headers, SESSION_COOKIE)?;
        let hash = id_hash(id);
        let s = catalog
            .now()
            .and_then(|now| Ok((now, catalog.touch_session(&hash, now)?)));
        let (now, s) = match s {
            Ok((now, Some(s))) => (now, s),
            Ok((_, None)) => return None,
            Err(e) => {
                tracing::warn!("reading a console session: {e}");
                return None;
            }
        };
        if !alive(&s, now) || !matches!(catalog.get_access_key(&s.key_id), Ok(Some(_))) {
            self.remove(id, catalog);
            return None;
        }
        Some(Signed {
            id: id.to_string(),
            key_id: s.key_id,
            read_only: s.read_only,
            csrf: s.csrf,
        })
    }

    /// Ends the session `id`.
    pub fn remove(&self, id: &str, catalog: &dyn Catalog) {
        if let Err(e) = catalog.delete_session(&id_hash(id)) {
            tracing::warn!("ending a console session: {e}");
        }
    }

    /// Keeps `flash` for the session's next page.
    pub fn set_flash(&self, id: &str, flash: Flash, catalog: &dyn Catalog) {
        let text = match serde_json::to_string(&flash) {
            Ok(t) => t,
            Err(e) => return tracing::warn!("a console message: {e}"),
        };
        if let Err(e) = catalog.set_session_flash(&id_hash(id), &text) {
            tracing::warn!("keeping a console message: {e}");
        }
    }

    /// The session's one-time message, taken (no other page shows it).
    pub fn take_flash(&self, id: &str, catalog: &dyn Catalog) -> Option<Flash> {
        match catalog.take_session_flash(&id_hash(id)) {
            Ok(text) => serde_json::from_str(&text?).ok(),
            Err(e) => {
                tracing::warn!("reading a console message: {e}");
                None
            }
        }
    }
}

fn chrono_duration(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}

fn alive(s: &ConsoleSession, now: DateTime<Utc>) -> bool {
    now - s.last_seen_at < chrono_duration(IDLE) && now - s.created_at < chrono_duration(LIFETIME)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn cookies_are_found_among_others() {
        let mut h = HeaderMap::new();
        h.append(
            "cookie",
            HeaderValue::from_static("a=1; strata_session=abc"),
        );
        h.append("cookie", HeaderValue::from_static("b=2"));
        assert_eq!(cookie(&h, SESSION_COOKIE), Some("abc"));
        assert_eq!(cookie(&h, "b"), Some("2"));
        assert_eq!(cookie(&h, "strata"), None);
    }

    #[test]
    fn tokens_are_random_and_compared_exactly() {
        let (a, b) = (random_token(), random_token());
        assert_eq!(a.len(), 64);
        assert_ne!(a, b);
        assert!(same(&a, &a.clone()));
        assert!(!same(&a, &b));
        assert!(!same(&a, &a[..63]));
    }

    #[test]
    fn cookie_attributes() {
        let c = set_cookie(SESSION_COOKIE, "x", IDLE, true);
        assert_eq!(
            c,
            "strata_session=x; Path=/console; HttpOnly; SameSite=Strict; Max-Age=1800; Secure"
        );
    }

    #[test]
    fn sessions_expire_when_idle() {
        let now = Utc::now();
        let mut s = ConsoleSession {
            id_hash: String::new(),
            key_id: "k".into(),
            read_only: false,
            csrf: String::new(),
            created_at: now,
            last_seen_at: now,
            flash: None,
        };
        assert!(alive(&s, now + chrono::Duration::seconds(60)));
        assert!(!alive(&s, now + chrono_duration(IDLE)));
        s.last_seen_at = now + chrono_duration(LIFETIME) - chrono::Duration::seconds(1);
        assert!(!alive(&s, now + chrono_duration(LIFETIME)));
    }

    #[test]
    fn a_session_started_on_one_node_is_known_to_another() {
        use strata_catalog::prelude::*;
        use strata_catalog::{AccessKey, SqliteCatalog};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.db");
        let (a, b) = (
            SqliteCatalog::open(&path).unwrap(),
            SqliteCatalog::open(&path).unwrap(),
        );
        a.add_access_key(&AccessKey {
            id: "AK1".into(),
            secret: "s".into(),
            read_only: true,
            description: String::new(),
            created_at: Utc::now(),
        })
        .unwrap();
        let principal = Principal {
            access_key_id: "AK1".into(),
            read_only: true,
        };
        let id = Sessions.create(&principal, &a).unwrap();
        let mut headers = HeaderMap::new();
        let value = format!("strata_session={id}");
        headers.append("cookie", HeaderValue::from_str(&value).unwrap());
        let on_b = Sessions
            .get(&headers, &b)
            .expect("node b knows the session");
        assert_eq!((on_b.key_id.as_str(), on_b.read_only), ("AK1", true));
        // Cookie values that are not a session: quotes, SQL, a path, and the
        // stored 64-character hash itself. Each only ever becomes a hash.
        let stored_hash = id_hash(&id);
        for hostile in ["'", "' OR '1'='1", "../../x", "a=b", stored_hash.as_str()] {
            let mut h = HeaderMap::new();
            let v = format!("strata_session={hostile}");
            h.append("cookie", HeaderValue::from_str(&v).unwrap());
            assert!(Sessions.get(&h, &b).is_none(), "{hostile:?} signed in");
        }
        // The catalog holds the id's hash only: the id itself signs in.
        let stored = b.touch_session(&id_hash(&id), Utc::now()).unwrap().unwrap();
        assert_ne!(stored.id_hash, id);
        assert!(a.touch_session(&id, Utc::now()).unwrap().is_none());
        // A message set through one node shows once, on the other.
        let flash = Flash::Failed {
            text: "no".into(),
            code: "InvalidParameter".into(),
        };
        Sessions.set_flash(&id, flash.clone(), &a);
        assert_eq!(Sessions.take_flash(&id, &b), Some(flash));
        assert_eq!(Sessions.take_flash(&id, &a), None);
        // Signing out on b ends it for a; a deleted key ends it too.
        Sessions.remove(&id, &b);
        assert!(Sessions.get(&headers, &a).is_none());
        let id = Sessions.create(&principal, &a).unwrap();
        let value = format!("strata_session={id}");
        let mut headers = HeaderMap::new();
        headers.append("cookie", HeaderValue::from_str(&value).unwrap());
        assert!(Sessions.get(&headers, &b).is_some());
        a.delete_access_key("AK1").unwrap();
        assert!(Sessions.get(&headers, &b).is_none());
    }
}
