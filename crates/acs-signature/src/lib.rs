//! Server-side verification of Alibaba Cloud API request signatures, as sent by the
//! official SDKs to an RPC-style endpoint: V3 `ACS3-HMAC-SHA256` (an `Authorization`
//! header over a canonical request) and V2 RPC `HMAC-SHA1` (a `Signature` query/form
//! parameter). Client-side signing ([`sign_v3`], [`sign_v2`]) is included for tests and
//! Strata's own tools.
//!
//! The flow on the server is: [`parse`] the request (no secret needed) → look up the
//! secret for [`Claim::access_key_id`] → [`Claim::check_time`] → [`Claim::verify`],
//! which returns the [`SignedCall`]: the action, version and parameters exactly as the
//! signature covers them. The server takes what it runs from there and nowhere else.
//! Nonce replay tracking is the caller's job: [`Claim::nonce`] and [`Claim::timestamp`]
//! are covered by the signature once `verify` succeeds.
//!
//! Both algorithms are checked against requests captured from the official Python SDK
//! (`tests/fixtures/gen_vectors.py`).
#![warn(missing_docs)]

mod encoding;
mod error;
mod v2;
mod v3;

use chrono::{DateTime, Duration, NaiveDateTime, Utc};

pub use encoding::{percent_encode, request_params};
pub use error::SignatureError;
pub use v2::sign_v2;
pub use v3::sign_v3;

use error::shown;

/// Everything the verifier needs from an HTTP request, transport-agnostic.
#[derive(Debug, Clone, Copy)]
pub struct RequestParts<'a> {
    /// HTTP method as received, e.g. `"GET"` or `"POST"`.
    pub method: &'a str,
    /// Raw (still percent-encoded) path, e.g. `"/"`.
    pub path: &'a str,
    /// Raw query string without the `?`; may be `""`.
    pub raw_query: &'a str,
    /// Request headers; names in any case, a name may occur several times. Must include
    /// `Host` as the client sent it (for HTTP/2, the `:authority`).
    pub headers: &'a [(String, String)],
    /// The raw body.
    pub body: &'a [u8],
}

impl<'a> RequestParts<'a> {
    /// All values of header `name` (case-insensitive), in order.
    pub(crate) fn header_values<'n>(
        &self,
        name: &'n str,
    ) -> impl Iterator<Item = &'a str> + use<'a, 'n> {
        let headers: &'a [(String, String)] = self.headers;
        headers
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The value of header `name`, which must not occur more than once.
    pub(crate) fn single_header(&self, name: &str) -> Result<Option<&'a str>, SignatureError> {
        let mut values = self.header_values(name);
        let first = values.next();
        if values.next().is_some() {
            return Err(SignatureError::Malformed(format!(
                "header `{name}` occurs more than once"
            )));
        }
        Ok(first)
    }
}

/// Which signature scheme a request uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignatureVersion {
    /// `ACS3-HMAC-SHA256` in the `Authorization` header.
    V3,
    /// RPC `HMAC-SHA1`, `SignatureVersion=1.0`, in the `Signature` parameter.
    V2,
}

/// What a request claims, read before the secret is known.
#[derive(Debug, Clone)]
pub struct Claim {
    /// The scheme the request is signed with.
    pub version: SignatureVersion,
    /// V3: `Credential` of the `Authorization` header; V2: the `AccessKeyId` parameter.
    pub access_key_id: String,
    /// V3: `x-acs-signature-nonce`; V2: `SignatureNonce`. Never empty.
    pub nonce: String,
    /// V3: `x-acs-date`; V2: `Timestamp`.
    pub timestamp: DateTime<Utc>,
    proof: Proof,
}

#[derive(Debug, Clone)]
enum Proof {
    V3(v3::Proof),
    V2(v2::Proof),
}

/// Reads the signature claim of a request without checking it.
///
/// V3 when an `Authorization` header starts with `ACS3-` (only `ACS3-HMAC-SHA256` is
/// supported), else V2 when the request has a `Signature` parameter (query or form
/// body), else [`SignatureError::UnsupportedAlgorithm`] when some other `Authorization`
/// scheme is present, else [`SignatureError::Unsigned`].
///
/// Structural checks happen here: required headers/parameters present and well formed,
/// for V3 the headers that must be signed are in `SignedHeaders` and every signed header
/// is on the request.
pub fn parse(req: &RequestParts) -> Result<Claim, SignatureError> {
    let authorization = req.single_header("authorization")?;
    if let Some(auth) = authorization {
        if auth.trim_start().starts_with("ACS3-") {
            return v3::parse(req, auth);
        }
    }
    let params = request_params(req)?;
    if params.iter().any(|(k, _)| k == "Signature") {
        return v2::parse(params);
    }
    match authorization {
        Some(auth) => {
            let scheme = auth.split_whitespace().next().unwrap_or("");
            Err(SignatureError::UnsupportedAlgorithm(shown(scheme)))
        }
        None => Err(SignatureError::Unsigned),
    }
}

/// What a verified request asks for, taken only from what its signature covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedCall {
    /// The action: the `Action` parameter, or for V3 the (signed) `x-acs-action` header.
    /// `None` when the request names none.
    pub action: Option<String>,
    /// The API version, from `Version` or (V3) `x-acs-version` likewise.
    pub version: Option<String>,
    /// Every parameter of the query string and form body, each name once (the signature
    /// parameters included), as [`request_params`] decodes them.
    pub params: Vec<(String, String)>,
}

impl Claim {
    /// Checks the signature of `req` (the request this claim was parsed from) with the
    /// AccessKey secret of [`Claim::access_key_id`] (comparison is constant-time), and
    /// returns what the request may run.
    ///
    /// Refused besides a mismatch: a parameter name given twice
    /// ([`SignatureError::DuplicateParameter`]); an `x-acs-action`/`x-acs-version` header
    /// that names something else than the `Action`/`Version` parameter
    /// ([`SignatureError::Conflict`]); for V2, which signs no header, such a header
    /// without the parameter ([`SignatureError::HeaderNotSigned`]).
    pub fn verify(&self, req: &RequestParts, secret: &str) -> Result<SignedCall, SignatureError> {
        let params = request_params(req)?;
        match &self.proof {
            Proof::V3(proof) => v3::verify(proof, req, secret)?,
            Proof::V2(proof) => v2::verify(proof, req, &params, secret)?,
        }
        let action = self.signed_value(req, &params, "Action", "x-acs-action")?;
        let version = self.signed_value(req, &params, "Version", "x-acs-version")?;
        Ok(SignedCall {
            action,
            version,
            params,
        })
    }

    /// The value of `param`, or of `header` where the signature covers it (V3, whose
    /// [`parse`] refused the header unsigned). When both are given they must agree.
    fn signed_value(
        &self,
        req: &RequestParts,
        params: &[(String, String)],
        param: &'static str,
        header: &'static str,
    ) -> Result<Option<String>, SignatureError> {
        let from_param = params
            .iter()
            .find(|(k, _)| k == param)
            .map(|(_, v)| v.trim())
            .filter(|v| !v.is_empty());
        let from_header = req.single_header(header)?.map(str::trim);
        match (from_param, from_header) {
            (Some(p), Some(h)) if p != h => Err(SignatureError::Conflict {
                header,
                header_value: shown(h),
                param,
                param_value: shown(p),
            }),
            (Some(p), _) => Ok(Some(p.to_owned())),
            (None, Some(_)) if self.version == SignatureVersion::V2 => {
                Err(SignatureError::HeaderNotSigned(header.to_owned()))
            }
            (None, Some(h)) => Ok(Some(h.to_owned()).filter(|h| !h.is_empty())),
            (None, None) => Ok(None),
        }
    }

    /// Refuses the claim when its timestamp is more than `skew` before or after `now`
    /// (Alibaba Cloud allows 15 minutes).
    pub fn check_time(&self, now: DateTime<Utc>, skew: Duration) -> Result<(), SignatureError> {
        if (now - self.timestamp).abs() > skew {
            return Err(SignatureError::TimestampExpired);
        }
        Ok(())
    }
}

/// Format of `x-acs-date` and `Timestamp`.
const TIMESTAMP_FORMAT: &str = "%Y-%m-%dT%H:%M:%SZ";

/// Parses `yyyy-MM-ddTHH:mm:ssZ` (UTC) strictly.
pub(crate) fn parse_timestamp(s: &str) -> Result<DateTime<Utc>, SignatureError> {
    let shape_ok = s.len() == 20
        && s.bytes().enumerate().all(|(i, b)| match i {
            4 | 7 => b == b'-',
            10 => b == b'T',
            13 | 16 => b == b':',
            19 => b == b'Z',
            _ => b.is_ascii_digit(),
        });
    if !shape_ok {
        return Err(SignatureError::TimestampFormat(shown(s)));
    }
    NaiveDateTime::parse_from_str(s, TIMESTAMP_FORMAT)
        .map(|naive| naive.and_utc())
        .map_err(|_| SignatureError::TimestampFormat(shown(s)))
}

pub(crate) fn format_timestamp(t: DateTime<Utc>) -> String {
    t.format(TIMESTAMP_FORMAT).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn timestamps_parse_strictly() {
        let t = parse_timestamp("2026-01-02T03:04:05Z").unwrap();
        assert_eq!(t, Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap());
        assert_eq!(format_timestamp(t), "2026-01-02T03:04:05Z");
        for bad in [
            "2026-01-02T03:04:05",
            "2026-01-02 03:04:05Z",
            "2026-01-02T03:04:05.000Z",
            "2026-01-02T03:04:05+00:00",
            "2026-13-02T03:04:05Z",
            "2026-02-30T03:04:05Z",
            "+026-01-02T03:04:05Z",
            "",
        ] {
            assert!(
                matches!(
                    parse_timestamp(bad),
                    Err(SignatureError::TimestampFormat(_))
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn unsigned_requests() {
        let headers = vec![("host".to_owned(), "example.com".to_owned())];
        let req = RequestParts {
            method: "GET",
            path: "/",
            raw_query: "Action=X&Version=1",
            headers: &headers,
            body: b"",
        };
        assert_eq!(parse(&req).unwrap_err(), SignatureError::Unsigned);
        let req = RequestParts {
            raw_query: "",
            ..req
        };
        assert_eq!(parse(&req).unwrap_err(), SignatureError::Unsigned);
    }

    #[test]
    fn other_authorization_schemes_are_unsupported() {
        let headers = vec![(
            "Authorization".to_owned(),
            "acs AKID:c2lnbmF0dXJl".to_owned(),
        )];
        let req = RequestParts {
            method: "GET",
            path: "/",
            raw_query: "",
            headers: &headers,
            body: b"",
        };
        assert_eq!(
            parse(&req).unwrap_err(),
            SignatureError::UnsupportedAlgorithm("acs".into())
        );
        let headers = vec![(
            "Authorization".to_owned(),
            "ACS3-HMAC-SM3 Credential=a,SignedHeaders=host,Signature=00".to_owned(),
        )];
        let req = RequestParts {
            headers: &headers,
            ..req
        };
        assert_eq!(
            parse(&req).unwrap_err(),
            SignatureError::UnsupportedAlgorithm("ACS3-HMAC-SM3".into())
        );
    }

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 3, 4, 5, 6, 7).unwrap()
    }

    fn call(req: &RequestParts, secret: &str) -> Result<SignedCall, SignatureError> {
        parse(req)?.verify(req, secret)
    }

    fn header(name: &str, value: &str) -> (String, String) {
        (name.to_owned(), value.to_owned())
    }

    /// Verifies a V2 POST with `query` and `headers`.
    fn v2(query: &str, headers: &[(String, String)]) -> Result<SignedCall, SignatureError> {
        let req = RequestParts {
            method: "POST",
            path: "/",
            raw_query: query,
            headers,
            body: b"",
        };
        call(&req, "s")
    }

    #[test]
    fn v2_action_comes_from_the_signed_parameter_only() {
        let delete = [header("x-acs-action", "DeleteBackup")];
        // Signed without `Action`: a header cannot supply one.
        let no_action = sign_v2("POST", &[("DBInstanceId", "pg-1")], "AK", "s", now(), "n");
        assert_eq!(v2(&no_action, &[]).unwrap().action, None);
        assert_eq!(
            v2(&no_action, &delete),
            Err(SignatureError::HeaderNotSigned("x-acs-action".into()))
        );
        // Signed with `Action`: the header may repeat it, never change it.
        let params = [("Action", "DescribeBackups"), ("Version", "2014-08-15")];
        let with_action = sign_v2("POST", &params, "AK", "s", now(), "n");
        let same = [
            header("X-Acs-Action", "DescribeBackups"),
            header("x-acs-version", "2014-08-15"),
        ];
        let ok = v2(&with_action, &same).unwrap();
        assert_eq!(ok.action.as_deref(), Some("DescribeBackups"));
        assert_eq!(ok.version.as_deref(), Some("2014-08-15"));
        assert!(matches!(
            v2(&with_action, &delete),
            Err(SignatureError::Conflict {
                header: "x-acs-action",
                param: "Action",
                ..
            })
        ));
        let twice = [
            header("x-acs-action", "DescribeBackups"),
            header("x-acs-action", "DeleteBackup"),
        ];
        assert!(
            matches!(v2(&with_action, &twice), Err(SignatureError::Malformed(m)) if m.contains("more than once"))
        );
        // An empty signed `Action` is no action: the header still cannot fill it in.
        let empty = sign_v2("POST", &[("Action", "")], "AK", "s", now(), "n");
        assert_eq!(
            v2(&empty, &delete),
            Err(SignatureError::HeaderNotSigned("x-acs-action".into()))
        );
    }

    /// Signs a V3 POST with `query` and the given extra headers; returns all headers.
    fn v3_headers(query: &str, extra: &[(String, String)]) -> Vec<(String, String)> {
        let mut headers = vec![header("host", "h")];
        headers.extend_from_slice(extra);
        let req = RequestParts {
            method: "POST",
            path: "/",
            raw_query: query,
            headers: &headers,
            body: b"",
        };
        let added = sign_v3(&req, "AK", "s", now(), "n").unwrap();
        headers.extend(added);
        headers
    }

    #[test]
    fn v3_action_from_signed_header_or_parameter() {
        let headers = v3_headers("A=1", &[header("x-acs-action", "DescribeBackups")]);
        let req = RequestParts {
            method: "POST",
            path: "/",
            raw_query: "A=1",
            headers: &headers,
            body: b"",
        };
        let got = call(&req, "s").unwrap();
        assert_eq!(got.action.as_deref(), Some("DescribeBackups"));
        assert_eq!(got.params, vec![("A".to_owned(), "1".to_owned())]);
        // A signed header and a signed parameter that disagree.
        let query = "Action=DeleteBackup";
        let headers = v3_headers(query, &[header("x-acs-action", "DescribeBackups")]);
        let req = RequestParts {
            raw_query: query,
            headers: &headers,
            ..req
        };
        assert!(matches!(
            call(&req, "s"),
            Err(SignatureError::Conflict {
                header: "x-acs-action",
                ..
            })
        ));
        // No header: the signed parameter.
        let query = "Action=DescribeBackups";
        let headers = v3_headers(query, &[]);
        let req = RequestParts {
            raw_query: query,
            headers: &headers,
            ..req
        };
        assert_eq!(
            call(&req, "s").unwrap().action.as_deref(),
            Some("DescribeBackups")
        );
    }

    #[test]
    fn v3_repeated_parameter_is_refused_in_any_order() {
        // V3 sorts repeated names by value, so both orders carry the same signature;
        // neither may run.
        let signed_order = "BackupId=1&BackupId=2";
        let headers = v3_headers(signed_order, &[header("x-acs-action", "DeleteBackup")]);
        for query in [signed_order, "BackupId=2&BackupId=1"] {
            let req = RequestParts {
                method: "POST",
                path: "/",
                raw_query: query,
                headers: &headers,
                body: b"",
            };
            assert_eq!(
                call(&req, "s"),
                Err(SignatureError::DuplicateParameter("BackupId".into())),
                "{query}"
            );
        }
    }

    #[test]
    fn check_time_window_is_symmetric() {
        let t = Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap();
        let claim = Claim {
            version: SignatureVersion::V2,
            access_key_id: "ak".into(),
            nonce: "n".into(),
            timestamp: t,
            proof: Proof::V2(v2::Proof::for_tests()),
        };
        let skew = Duration::minutes(15);
        assert_eq!(claim.check_time(t + Duration::minutes(15), skew), Ok(()));
        assert_eq!(claim.check_time(t - Duration::minutes(15), skew), Ok(()));
        assert_eq!(
            claim.check_time(t + Duration::seconds(15 * 60 + 1), skew),
            Err(SignatureError::TimestampExpired)
        );
        assert_eq!(
            claim.check_time(t - Duration::seconds(15 * 60 + 1), skew),
            Err(SignatureError::TimestampExpired)
        );
    }
}
