//! The one error type of this crate. Each variant is a distinct reason to refuse a
//! request, so the server can map them to its own error codes (for example
//! `IncompleteSignature`, `SignatureDoesNotMatch`, `InvalidTimeStamp.Expired`).

/// Why a request's signature was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// The request carries neither an `Authorization` header nor a `Signature` parameter.
    #[error("request is not signed")]
    Unsigned,
    /// The signature data cannot be read: an unparseable `Authorization` header, a
    /// missing or repeated required parameter or header, bad percent-encoding. The
    /// message names what is wrong.
    #[error("malformed signed request: {0}")]
    Malformed(String),
    /// The request is signed with an algorithm or signature version this crate does not
    /// verify (e.g. `ACS3-HMAC-SM3`, `SignatureMethod=HMAC-SHA256`). Names it.
    #[error("unsupported signature algorithm: {0}")]
    UnsupportedAlgorithm(String),
    /// V3: a header that must be covered by the signature when present (`host`,
    /// `content-type`, `x-acs-date`, `x-acs-signature-nonce`, `x-acs-action`,
    /// `x-acs-version`) is on the request but not in `SignedHeaders`. V2, which signs no
    /// header: `x-acs-action` or `x-acs-version` without the signed `Action` or `Version`
    /// parameter it would have to repeat. Names it.
    #[error("header `{0}` is present but not signed")]
    HeaderNotSigned(String),
    /// The signature does not match the request under the given secret.
    #[error("signature does not match")]
    Mismatch,
    /// V3: the `x-acs-content-sha256` header is not the SHA-256 of the body received.
    #[error("x-acs-content-sha256 does not match the request body")]
    BodyHashMismatch,
    /// A parameter name occurs more than once in the query string and form body together.
    /// Refused because V3 does not sign the order of repeated names. Names it.
    #[error("parameter `{0}` is given more than once")]
    DuplicateParameter(String),
    /// `x-acs-action` or `x-acs-version` names something else than the signed `Action`
    /// or `Version` parameter of the same request.
    #[error(
        "header `{header}` ({header_value}) disagrees with parameter `{param}` ({param_value})"
    )]
    Conflict {
        /// The header (`x-acs-action` or `x-acs-version`).
        header: &'static str,
        /// What the header said.
        header_value: String,
        /// The signed parameter (`Action` or `Version`).
        param: &'static str,
        /// What the signed parameter said.
        param_value: String,
    },
    /// The timestamp (`x-acs-date` or `Timestamp`) is not `yyyy-MM-ddTHH:mm:ssZ`.
    #[error("bad timestamp (expected yyyy-MM-ddTHH:mm:ssZ): {0}")]
    TimestampFormat(String),
    /// The timestamp is further from the server's clock than the allowed skew.
    #[error("timestamp is outside the allowed clock skew")]
    TimestampExpired,
}

/// Shortens client-supplied text before it goes into an error message, escaping
/// control characters so it is safe to log.
pub(crate) fn shown(s: &str) -> String {
    const MAX: usize = 64;
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i == MAX {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    out
}
