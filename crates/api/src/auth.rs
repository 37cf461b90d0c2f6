//! Who is calling: the request's signature (V3 `ACS3-HMAC-SHA256` or V2
//! `HMAC-SHA1`) checked against the AccessKey secret in the catalog, its
//! timestamp within 15 minutes of the server clock, its nonce never seen
//! before inside that window. What the request may run (action, version,
//! parameters) comes out of the verification itself, as the signature covers it.

use acs_signature::{RequestParts, SignedCall};
use axum::http::StatusCode;
use chrono::{Duration, Utc};
use strata_catalog::Catalog;

use crate::error::{ApiError, ApiResult};

/// Clock skew a signed request may have, and so how long a nonce is kept.
pub const MAX_SKEW_MINUTES: i64 = 15;

/// Who signed a request.
#[derive(Debug, Clone)]
pub struct Principal {
    /// The AccessKey that signed it.
    pub access_key_id: String,
    /// Read-only keys call `Describe*` actions only.
    pub read_only: bool,
}

/// The caller of `req` and what it signed.
pub fn authenticate(
    catalog: &dyn Catalog,
    req: &RequestParts,
) -> ApiResult<(Principal, SignedCall)> {
    let claim = acs_signature::parse(req)?;
    let key = catalog
        .get_access_key(&claim.access_key_id)?
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "InvalidAccessKeyId.NotFound",
                "Specified access key is not found.",
            )
        })?;
    let call = claim.verify(req, &key.secret)?;
    let now = Utc::now();
    claim.check_time(now, Duration::minutes(MAX_SKEW_MINUTES))?;
    // Kept in the catalog, so a restart does not reopen the replay window.
    let horizon = now - Duration::minutes(2 * MAX_SKEW_MINUTES);
    if !catalog.admit_nonce(&key.id, &claim.nonce, now, horizon)? {
        return Err(ApiError::bad(
            "SignatureNonceUsed",
            "Specified signature nonce was used already.",
        ));
    }
    let principal = Principal {
        access_key_id: key.id,
        read_only: key.read_only,
    };
    Ok((principal, call))
}
