//! Console sessions. Signing in checks an AccessKey pair against the
//! catalog; the session then lives in this process under an opaque random
//! id carried by an `HttpOnly`, `SameSite=Strict` cookie scoped to
//! `/console`, and ends after [`IDLE`] without requests, [`LIFETIME`] after
//! sign-in, at sign-out, or when its key is deleted. Each session has its own
//! CSRF token that every form and state-changing request must return.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

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
#[derive(Debug, Clone, PartialEq)]
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

#[derive(Debug, Clone)]
struct Session {
    key_id: String,
    read_only: bool,
    csrf: String,
    created: Instant,
    last_seen: Instant,
    flash: Option<Flash>,
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

#[derive(Default)]
pub struct Sessions {
    map: Mutex<HashMap<String, Session>>,
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
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts a session for `principal`; returns its id.
    pub fn create(&self, principal: &Principal) -> String {
        let now = Instant::now();
        let id = random_token();
        let mut map = self.lock();
        map.retain(|_, s| alive(s, now));
        map.insert(
            id.clone(),
            Session {
                key_id: principal.access_key_id.clone(),
                read_only: principal.read_only,
                csrf: random_token(),
                created: now,
                last_seen: now,
                flash: None,
            },
        );
        id
    }

    /// The live session the request's cookie names, if any. Its key must
    /// still exist: deleting a key signs its sessions out.
    pub fn get(&self, headers: &HeaderMap, catalog: &dyn Catalog) -> Option<Signed> {
        let id = cookie(headers, SESSION_COOKIE)?;
        let now = Instant::now();
        let signed = {
            let mut map = self.lock();
            let s = map.get_mut(id)?;
            if !alive(s, now) {
                map.remove(id);
                return None;
            }
            s.last_seen = now;
            Signed {
                id: id.to_string(),
                key_id: s.key_id.clone(),
                read_only: s.read_only,
                csrf: s.csrf.clone(),
            }
        };
        if !matches!(catalog.get_access_key(&signed.key_id), Ok(Some(_))) {
            self.remove(&signed.id);
            return None;
        }
        Some(signed)
    }

    pub fn remove(&self, id: &str) {
        self.lock().remove(id);
    }

    pub fn set_flash(&self, id: &str, flash: Flash) {
        if let Some(s) = self.lock().get_mut(id) {
            s.flash = Some(flash);
        }
    }

    pub fn take_flash(&self, id: &str) -> Option<Flash> {
        self.lock().get_mut(id).and_then(|s| s.flash.take())
    }
}

fn alive(s: &Session, now: Instant) -> bool {
    now.duration_since(s.last_seen) < IDLE && now.duration_since(s.created) < LIFETIME
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
        let now = Instant::now();
        let mut s = Session {
            key_id: "k".into(),
            read_only: false,
            csrf: String::new(),
            created: now,
            last_seen: now,
            flash: None,
        };
        assert!(alive(&s, now + Duration::from_secs(60)));
        assert!(!alive(&s, now + IDLE));
        s.last_seen = now + LIFETIME - Duration::from_secs(1);
        assert!(!alive(&s, now + LIFETIME));
    }
}
