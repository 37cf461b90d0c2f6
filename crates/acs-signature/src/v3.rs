//! V3 signatures, `ACS3-HMAC-SHA256` in the `Authorization` header.
//!
//! Canonical request: `METHOD\nCanonicalURI\nCanonicalQueryString\nCanonicalHeaders\n`
//! `SignedHeaders\nHashedRequestPayload`, where the URI is the decoded path re-encoded
//! per RFC 3986 keeping `/`; the query is every decoded parameter re-encoded, sorted by
//! encoded key then value, as `k=v` joined by `&`; the headers are `name:value\n` for
//! each signed header (several values of one name trimmed, sorted, joined by `,`, as the
//! SDK does); the payload hash is the lower-case hex SHA-256 of the body. The string to
//! sign is `ACS3-HMAC-SHA256\n` + hex(SHA-256(canonical request)); the signature is
//! lower-case hex HMAC-SHA256(secret, string to sign).

use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};

use crate::encoding::{encode_path, parse_urlencoded, percent_decode, percent_encode};
use crate::error::shown;
use crate::{
    format_timestamp, parse_timestamp, Claim, RequestParts, SignatureError, SignatureVersion,
};
use chrono::{DateTime, Utc};

const ALGORITHM: &str = "ACS3-HMAC-SHA256";

/// Headers that must be in `SignedHeaders` whenever the request has them, so that the
/// target, the action and the replay-protection values cannot be swapped.
const MUST_SIGN_IF_PRESENT: [&str; 6] = [
    "host",
    "content-type",
    "x-acs-action",
    "x-acs-version",
    "x-acs-date",
    "x-acs-signature-nonce",
];

/// Headers [`sign_v3`] adds itself.
const ADDED_BY_SIGNER: [&str; 4] = [
    "authorization",
    "x-acs-date",
    "x-acs-signature-nonce",
    "x-acs-content-sha256",
];

/// What [`verify`] needs from the `Authorization` header.
#[derive(Debug, Clone)]
pub(crate) struct Proof {
    signed_headers: Vec<String>,
    signature: Vec<u8>,
}

struct Authorization<'s> {
    credential: &'s str,
    signed_headers: Vec<String>,
    signature: Vec<u8>,
}

fn malformed(message: impl Into<String>) -> SignatureError {
    SignatureError::Malformed(message.into())
}

/// `ACS3-HMAC-SHA256 Credential=<ak>,SignedHeaders=<a;b>,Signature=<hex>`; spaces after
/// the commas are tolerated, unknown or repeated fields are not.
fn parse_authorization(value: &str) -> Result<Authorization<'_>, SignatureError> {
    let value = value.trim();
    let (algorithm, rest) = value
        .split_once(|c: char| c.is_ascii_whitespace())
        .unwrap_or((value, ""));
    if algorithm != ALGORITHM {
        return Err(SignatureError::UnsupportedAlgorithm(shown(algorithm)));
    }
    let (mut credential, mut signed_headers, mut signature) = (None, None, None);
    for field in rest.split(',').map(str::trim).filter(|f| !f.is_empty()) {
        let (key, val) = field.split_once('=').ok_or_else(|| {
            malformed(format!("Authorization field without `=`: {}", shown(field)))
        })?;
        let slot = match key {
            "Credential" => &mut credential,
            "SignedHeaders" => &mut signed_headers,
            "Signature" => &mut signature,
            _ => {
                return Err(malformed(format!(
                    "unknown Authorization field `{}`",
                    shown(key)
                )))
            }
        };
        if slot.replace(val.trim()).is_some() {
            return Err(malformed(format!("Authorization field `{key}` repeated")));
        }
    }
    fn required<'s>(slot: Option<&'s str>, name: &str) -> Result<&'s str, SignatureError> {
        slot.filter(|v| !v.is_empty())
            .ok_or_else(|| malformed(format!("Authorization lacks {name}")))
    }
    let credential = required(credential, "Credential")?;
    let signed_headers = parse_signed_headers(required(signed_headers, "SignedHeaders")?)?;
    let signature = required(signature, "Signature")?;
    if signature.len() != 64 {
        return Err(malformed("Authorization Signature is not 64 hex digits"));
    }
    let signature = hex::decode(signature)
        .map_err(|_| malformed("Authorization Signature is not 64 hex digits"))?;
    Ok(Authorization {
        credential,
        signed_headers,
        signature,
    })
}

/// Lower-case header names separated by `;`, sorted, without repeats.
fn parse_signed_headers(list: &str) -> Result<Vec<String>, SignatureError> {
    let names: Vec<String> = list.split(';').map(str::to_owned).collect();
    for name in &names {
        let ok = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_graphic() && !b.is_ascii_uppercase() && !b";,=".contains(&b));
        if !ok {
            return Err(malformed(format!(
                "SignedHeaders has an invalid header name: {}",
                shown(name)
            )));
        }
    }
    if names.windows(2).any(|w| w[0] >= w[1]) {
        return Err(malformed("SignedHeaders is not sorted or repeats a name"));
    }
    Ok(names)
}

pub(crate) fn parse(req: &RequestParts, authorization: &str) -> Result<Claim, SignatureError> {
    let auth = parse_authorization(authorization)?;
    let date = req
        .single_header("x-acs-date")?
        .ok_or_else(|| malformed("missing x-acs-date header"))?;
    let nonce = req
        .single_header("x-acs-signature-nonce")?
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| malformed("missing x-acs-signature-nonce header"))?;
    for name in MUST_SIGN_IF_PRESENT {
        if req.header_values(name).next().is_some()
            && !auth.signed_headers.iter().any(|s| s == name)
        {
            return Err(SignatureError::HeaderNotSigned(name.to_owned()));
        }
    }
    if let Some(missing) = auth
        .signed_headers
        .iter()
        .find(|name| req.header_values(name).next().is_none())
    {
        return Err(malformed(format!(
            "signed header `{}` is missing from the request",
            shown(missing)
        )));
    }
    let timestamp = parse_timestamp(date.trim())?;
    Ok(Claim {
        version: SignatureVersion::V3,
        access_key_id: auth.credential.to_owned(),
        nonce: nonce.to_owned(),
        timestamp,
        proof: crate::Proof::V3(Proof {
            signed_headers: auth.signed_headers,
            signature: auth.signature,
        }),
    })
}

pub(crate) fn verify(
    proof: &Proof,
    req: &RequestParts,
    secret: &str,
) -> Result<(), SignatureError> {
    let payload_hash = hex::encode(Sha256::digest(req.body));
    if let Some(claimed) = req.single_header("x-acs-content-sha256")? {
        if !claimed.trim().eq_ignore_ascii_case(&payload_hash) {
            return Err(SignatureError::BodyHashMismatch);
        }
    }
    let canonical = canonical_request(req, req.headers, &proof.signed_headers, &payload_hash)?;
    mac(secret, &string_to_sign(&canonical))
        .verify_slice(&proof.signature)
        .map_err(|_| SignatureError::Mismatch)
}

fn mac(secret: &str, string_to_sign: &str) -> Hmac<Sha256> {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes keys of any length");
    mac.update(string_to_sign.as_bytes());
    mac
}

fn string_to_sign(canonical_request: &str) -> String {
    format!(
        "{ALGORITHM}\n{}",
        hex::encode(Sha256::digest(canonical_request.as_bytes()))
    )
}

/// The canonical request of `req`, with headers taken from `headers` (the request's own
/// when verifying, those plus the added ones when signing).
fn canonical_request(
    req: &RequestParts,
    headers: &[(String, String)],
    signed_headers: &[String],
    payload_hash: &str,
) -> Result<String, SignatureError> {
    let uri = if req.path.is_empty() {
        "/".to_owned()
    } else {
        encode_path(
            &percent_decode(req.path, false)
                .ok_or_else(|| malformed("invalid percent-encoding in path"))?,
        )
    };
    let mut query: Vec<(String, String)> = parse_urlencoded(req.raw_query, "query string")?
        .into_iter()
        .map(|(k, v)| (percent_encode(&k), percent_encode(&v)))
        .collect();
    query.sort();
    let query: Vec<String> = query.into_iter().map(|(k, v)| format!("{k}={v}")).collect();
    let mut canonical_headers = String::new();
    for name in signed_headers {
        let mut values: Vec<&str> = headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim())
            .collect();
        values.sort_unstable();
        canonical_headers.push_str(&format!("{name}:{}\n", values.join(",")));
    }
    Ok(format!(
        "{}\n{uri}\n{}\n{canonical_headers}\n{}\n{payload_hash}",
        req.method,
        query.join("&"),
        signed_headers.join(";")
    ))
}

/// Signs `req` with V3 `ACS3-HMAC-SHA256` and returns the headers to add to it, in this
/// order: `x-acs-date` (from `now`), `x-acs-signature-nonce`, `x-acs-content-sha256`,
/// `authorization`.
///
/// `req.headers` must contain `host` (and normally `x-acs-action`, `x-acs-version`) and
/// none of the four added headers. The signature covers `host`, `content-type` and every
/// `x-acs-*` header of `req`, plus the added ones; the path, the query and the body.
/// `nonce` must be unique per request (e.g. random hex) and not empty.
pub fn sign_v3(
    req: &RequestParts,
    access_key_id: &str,
    secret: &str,
    now: DateTime<Utc>,
    nonce: &str,
) -> Result<Vec<(String, String)>, SignatureError> {
    if req.header_values("host").next().is_none() {
        return Err(malformed("sign_v3: request has no host header"));
    }
    if let Some(name) = ADDED_BY_SIGNER
        .into_iter()
        .find(|name| req.header_values(name).next().is_some())
    {
        return Err(malformed(format!(
            "sign_v3: request already has a `{name}` header"
        )));
    }
    if nonce.trim().is_empty() {
        return Err(malformed("sign_v3: empty nonce"));
    }
    let payload_hash = hex::encode(Sha256::digest(req.body));
    let mut added = vec![
        ("x-acs-date".to_owned(), format_timestamp(now)),
        ("x-acs-signature-nonce".to_owned(), nonce.to_owned()),
        ("x-acs-content-sha256".to_owned(), payload_hash.clone()),
    ];
    let all_headers: Vec<(String, String)> = req
        .headers
        .iter()
        .cloned()
        .chain(added.iter().cloned())
        .collect();
    let mut signed_headers: Vec<String> = all_headers
        .iter()
        .map(|(name, _)| name.to_ascii_lowercase())
        .filter(|name| name == "host" || name == "content-type" || name.starts_with("x-acs-"))
        .collect();
    signed_headers.sort();
    signed_headers.dedup();
    let canonical = canonical_request(req, &all_headers, &signed_headers, &payload_hash)?;
    let signature = hex::encode(
        mac(secret, &string_to_sign(&canonical))
            .finalize()
            .into_bytes(),
    );
    added.push((
        "authorization".to_owned(),
        format!(
            "{ALGORITHM} Credential={access_key_id},SignedHeaders={},Signature={signature}",
            signed_headers.join(";")
        ),
    ));
    Ok(added)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 3, 4, 5, 6, 7).unwrap()
    }

    fn base_headers() -> Vec<(String, String)> {
        vec![
            ("Host".to_owned(), "rds.example.com".to_owned()),
            ("x-acs-action".to_owned(), "DescribeBackups".to_owned()),
            ("x-acs-version".to_owned(), "2014-08-15".to_owned()),
            ("User-Agent".to_owned(), "strata-test".to_owned()),
        ]
    }

    /// Signs a request and returns its full header list.
    fn signed(
        query: &str,
        body: &[u8],
        mut headers: Vec<(String, String)>,
    ) -> Vec<(String, String)> {
        let req = RequestParts {
            method: "POST",
            path: "/",
            raw_query: query,
            headers: &headers,
            body,
        };
        let added = sign_v3(&req, "AKID", "s3cr3t", now(), "nonce-1").unwrap();
        headers.extend(added);
        headers
    }

    #[test]
    fn sign_then_verify_round_trip() {
        let query = "DBInstanceId=pg-1&DBName=a+b%2Bc";
        let headers = signed(query, b"", base_headers());
        let names: Vec<&str> = headers[4..].iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "x-acs-date",
                "x-acs-signature-nonce",
                "x-acs-content-sha256",
                "authorization"
            ]
        );
        assert_eq!(headers[4].1, "2026-03-04T05:06:07Z");
        assert_eq!(
            headers[6].1,
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        let auth = &headers[7].1;
        assert!(
            auth.starts_with(
                "ACS3-HMAC-SHA256 Credential=AKID,SignedHeaders=host;x-acs-action;x-acs-content-sha256;\
                 x-acs-date;x-acs-signature-nonce;x-acs-version,Signature="
            ),
            "{auth}"
        );
        let req = RequestParts {
            method: "POST",
            path: "/",
            raw_query: query,
            headers: &headers,
            body: b"",
        };
        let claim = crate::parse(&req).unwrap();
        assert_eq!(claim.version, SignatureVersion::V3);
        assert_eq!(claim.access_key_id, "AKID");
        assert_eq!(claim.nonce, "nonce-1");
        assert_eq!(claim.timestamp, now());
        assert_eq!(claim.verify(&req, "s3cr3t").map(drop), Ok(()));
        assert_eq!(claim.verify(&req, "wrong"), Err(SignatureError::Mismatch));
        // `+` and `%20` are the same space; changing the method is not.
        let req2 = RequestParts {
            raw_query: "DBName=a%20b%2Bc&DBInstanceId=pg-1",
            ..req
        };
        assert_eq!(claim.verify(&req2, "s3cr3t").map(drop), Ok(()));
        let req3 = RequestParts {
            method: "GET",
            ..req
        };
        assert_eq!(claim.verify(&req3, "s3cr3t"), Err(SignatureError::Mismatch));
        let req4 = RequestParts {
            raw_query: "DBInstanceId=pg-2&DBName=a+b%2Bc",
            ..req
        };
        assert_eq!(claim.verify(&req4, "s3cr3t"), Err(SignatureError::Mismatch));
    }

    #[test]
    fn known_signature_value() {
        // Independent check of the whole pipeline with a fixed request; the expected value
        // was computed with the official Python SDK's `Utils.get_authorization`.
        let headers = signed("A=1", b"", base_headers());
        assert_eq!(
            headers[7].1,
            "ACS3-HMAC-SHA256 Credential=AKID,SignedHeaders=host;x-acs-action;x-acs-content-sha256;x-acs-date;\
             x-acs-signature-nonce;x-acs-version,Signature=4811287c09c4ffafac6432f0109204eeaf5438807a5e026c55d927dbf5e021b4"
        );
    }

    #[test]
    fn body_is_covered() {
        let mut headers = base_headers();
        headers.push((
            "content-type".to_owned(),
            "application/x-www-form-urlencoded".to_owned(),
        ));
        let headers = signed("", b"A=1", headers);
        let req = RequestParts {
            method: "POST",
            path: "/",
            raw_query: "",
            headers: &headers,
            body: b"A=1",
        };
        let claim = crate::parse(&req).unwrap();
        assert_eq!(claim.verify(&req, "s3cr3t").map(drop), Ok(()));
        let changed = RequestParts {
            body: b"A=2",
            ..req
        };
        assert_eq!(
            claim.verify(&changed, "s3cr3t"),
            Err(SignatureError::BodyHashMismatch)
        );
        // Without the hash header the body still enters the canonical request.
        let no_hash: Vec<_> = headers
            .iter()
            .filter(|(n, _)| n != "x-acs-content-sha256")
            .cloned()
            .collect();
        let changed = RequestParts {
            headers: &no_hash,
            body: b"A=2",
            ..req
        };
        assert_eq!(
            claim.verify(&changed, "s3cr3t"),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn sign_v3_refuses_bad_input() {
        let no_host: Vec<_> = base_headers().into_iter().skip(1).collect();
        let req = RequestParts {
            method: "POST",
            path: "/",
            raw_query: "",
            headers: &no_host,
            body: b"",
        };
        assert!(
            matches!(sign_v3(&req, "a", "s", now(), "n"), Err(SignatureError::Malformed(m)) if m.contains("host"))
        );
        let mut dup = base_headers();
        dup.push(("X-Acs-Date".to_owned(), "2026-01-01T00:00:00Z".to_owned()));
        let req = RequestParts {
            headers: &dup,
            ..req
        };
        assert!(
            matches!(sign_v3(&req, "a", "s", now(), "n"), Err(SignatureError::Malformed(m)) if m.contains("x-acs-date"))
        );
        let ok = base_headers();
        let req = RequestParts {
            headers: &ok,
            ..req
        };
        assert!(
            matches!(sign_v3(&req, "a", "s", now(), " "), Err(SignatureError::Malformed(m)) if m.contains("nonce"))
        );
    }

    fn with_auth(auth: &str) -> Vec<(String, String)> {
        let mut headers = base_headers();
        headers.push(("x-acs-date".to_owned(), "2026-03-04T05:06:07Z".to_owned()));
        headers.push(("x-acs-signature-nonce".to_owned(), "n1".to_owned()));
        headers.push(("Authorization".to_owned(), auth.to_owned()));
        headers
    }

    fn parse_auth(auth: &str) -> Result<Claim, SignatureError> {
        let headers = with_auth(auth);
        let req = RequestParts {
            method: "POST",
            path: "/",
            raw_query: "",
            headers: &headers,
            body: b"",
        };
        crate::parse(&req)
    }

    const SIG: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    const ALL: &str = "host;x-acs-action;x-acs-date;x-acs-signature-nonce;x-acs-version";

    #[test]
    fn authorization_header_parsing() {
        let claim = parse_auth(&format!(
            "ACS3-HMAC-SHA256 Credential=AK1, SignedHeaders={ALL},  Signature={SIG}"
        ))
        .unwrap();
        assert_eq!(claim.access_key_id, "AK1");
        assert_eq!(claim.nonce, "n1");
        let malformed_cases = [
            (format!("ACS3-HMAC-SHA256 SignedHeaders={ALL},Signature={SIG}"), "lacks Credential"),
            (format!("ACS3-HMAC-SHA256 Credential=,SignedHeaders={ALL},Signature={SIG}"), "lacks Credential"),
            (format!("ACS3-HMAC-SHA256 Credential=AK1,Signature={SIG}"), "lacks SignedHeaders"),
            (format!("ACS3-HMAC-SHA256 Credential=AK1,SignedHeaders={ALL}"), "lacks Signature"),
            ("ACS3-HMAC-SHA256".to_owned(), "lacks Credential"),
            (format!("ACS3-HMAC-SHA256 Credential=AK1,SignedHeaders={ALL},Signature=abc"), "64 hex"),
            (format!("ACS3-HMAC-SHA256 Credential=AK1,SignedHeaders={ALL},Signature={}", "zz".repeat(32)), "64 hex"),
            (format!("ACS3-HMAC-SHA256 Credential=AK1,Credential=AK2,SignedHeaders={ALL},Signature={SIG}"), "repeated"),
            (format!("ACS3-HMAC-SHA256 Credential=AK1,Region=x,SignedHeaders={ALL},Signature={SIG}"), "unknown"),
            (format!("ACS3-HMAC-SHA256 Credential=AK1,Oops,SignedHeaders={ALL},Signature={SIG}"), "without `=`"),
            (
                format!("ACS3-HMAC-SHA256 Credential=AK1,SignedHeaders=x-acs-date;host;x-acs-action;x-acs-signature-nonce;x-acs-version,Signature={SIG}"),
                "not sorted",
            ),
            (format!("ACS3-HMAC-SHA256 Credential=AK1,SignedHeaders=Host;{ALL},Signature={SIG}"), "invalid header name"),
            (format!("ACS3-HMAC-SHA256 Credential=AK1,SignedHeaders={ALL};;z,Signature={SIG}"), "invalid header name"),
            (
                format!("ACS3-HMAC-SHA256 Credential=AK1,SignedHeaders={ALL};x-acs-zzz,Signature={SIG}"),
                "`x-acs-zzz` is missing",
            ),
        ];
        for (auth, want) in malformed_cases {
            match parse_auth(&auth) {
                Err(SignatureError::Malformed(m)) => assert!(m.contains(want), "{auth}: {m}"),
                other => panic!("{auth}: {other:?}"),
            }
        }
        assert_eq!(
            parse_auth(&format!("ACS3-HMAC-SHA256 Credential=AK1,SignedHeaders=host;x-acs-action;x-acs-date;x-acs-version,Signature={SIG}")).unwrap_err(),
            SignatureError::HeaderNotSigned("x-acs-signature-nonce".into())
        );
        assert_eq!(
            parse_auth(&format!("ACS3-HMAC-SHA256 Credential=AK1,SignedHeaders=x-acs-action;x-acs-date;x-acs-signature-nonce;x-acs-version,Signature={SIG}")).unwrap_err(),
            SignatureError::HeaderNotSigned("host".into())
        );
    }

    #[test]
    fn date_and_nonce_are_required() {
        let auth = format!("ACS3-HMAC-SHA256 Credential=AK1,SignedHeaders={ALL},Signature={SIG}");
        for (drop, want) in [
            ("x-acs-date", "missing x-acs-date"),
            ("x-acs-signature-nonce", "missing x-acs-signature-nonce"),
        ] {
            let headers: Vec<_> = with_auth(&auth)
                .into_iter()
                .filter(|(n, _)| n != drop)
                .collect();
            let req = RequestParts {
                method: "POST",
                path: "/",
                raw_query: "",
                headers: &headers,
                body: b"",
            };
            assert!(
                matches!(crate::parse(&req), Err(SignatureError::Malformed(m)) if m.contains(want))
            );
        }
        let mut headers = with_auth(&auth);
        headers[4].1 = "2026-03-04 05:06:07".to_owned();
        let req = RequestParts {
            method: "POST",
            path: "/",
            raw_query: "",
            headers: &headers,
            body: b"",
        };
        assert_eq!(
            crate::parse(&req).unwrap_err(),
            SignatureError::TimestampFormat("2026-03-04 05:06:07".into())
        );
        let mut headers = with_auth(&auth);
        headers.push(("x-acs-signature-nonce".to_owned(), "n2".to_owned()));
        let req = RequestParts {
            headers: &headers,
            ..req
        };
        assert!(
            matches!(crate::parse(&req), Err(SignatureError::Malformed(m)) if m.contains("more than once"))
        );
    }

    #[test]
    fn canonical_request_layout() {
        let headers = vec![
            ("Host".to_owned(), " h.example ".to_owned()),
            ("X-Acs-Multi".to_owned(), "b".to_owned()),
            ("x-acs-multi".to_owned(), " a ".to_owned()),
        ];
        let req = RequestParts {
            method: "GET",
            path: "/a%20b/c d",
            raw_query: "z=1&a=x+y&a=%2A&e",
            headers: &headers,
            body: b"",
        };
        let signed = vec!["host".to_owned(), "x-acs-multi".to_owned()];
        let canonical = canonical_request(&req, req.headers, &signed, "HASH").unwrap();
        assert_eq!(canonical, "GET\n/a%20b/c%20d\na=%2A&a=x%20y&e=&z=1\nhost:h.example\nx-acs-multi:a,b\n\nhost;x-acs-multi\nHASH");
    }
}
