//! V2 RPC signatures: `SignatureMethod=HMAC-SHA1`, `SignatureVersion=1.0`, the signature
//! in the `Signature` query or form parameter.
//!
//! The signed parameters are those of [`crate::request_params`] (query plus form body)
//! minus `Signature`, sorted by key, as `percentEncode(k)=percentEncode(v)` joined by
//! `&`. The string to sign is `METHOD&%2F&` + percentEncode(that); the signature is
//! base64(HMAC-SHA1(secret + "&", string to sign)). Neither the path nor any header is
//! covered.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use chrono::{DateTime, Utc};
use hmac::{Hmac, KeyInit, Mac};
use sha1::Sha1;

use crate::encoding::{last_wins, percent_encode};
use crate::error::shown;
use crate::{
    format_timestamp, parse_timestamp, Claim, RequestParts, SignatureError, SignatureVersion,
};

/// What [`verify`] needs: the decoded `Signature` parameter.
#[derive(Debug, Clone)]
pub(crate) struct Proof {
    signature: Vec<u8>,
}

#[cfg(test)]
impl Proof {
    pub(crate) fn for_tests() -> Self {
        Proof {
            signature: Vec::new(),
        }
    }
}

/// Reads the claim from the request's parameters (as [`crate::request_params`] returns them).
pub(crate) fn parse(params: Vec<(String, String)>) -> Result<Claim, SignatureError> {
    let required = |name: &str| -> Result<&str, SignatureError> {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.is_empty())
            .ok_or_else(|| SignatureError::Malformed(format!("missing parameter {name}")))
    };
    let access_key_id = required("AccessKeyId")?;
    let signature = required("Signature")?;
    let method = required("SignatureMethod")?;
    let version = required("SignatureVersion")?;
    let nonce = required("SignatureNonce")?;
    let timestamp = required("Timestamp")?;
    if method != "HMAC-SHA1" {
        return Err(SignatureError::UnsupportedAlgorithm(format!(
            "SignatureMethod={}",
            shown(method)
        )));
    }
    if version != "1.0" {
        return Err(SignatureError::UnsupportedAlgorithm(format!(
            "SignatureVersion={}",
            shown(version)
        )));
    }
    let signature = STANDARD
        .decode(signature)
        .map_err(|_| SignatureError::Malformed("parameter Signature is not base64".to_owned()))?;
    Ok(Claim {
        version: SignatureVersion::V2,
        access_key_id: access_key_id.to_owned(),
        nonce: nonce.to_owned(),
        timestamp: parse_timestamp(timestamp)?,
        proof: crate::Proof::V2(Proof { signature }),
    })
}

/// `params` are the request's own, as [`crate::request_params`] returned them (unique names).
pub(crate) fn verify(
    proof: &Proof,
    req: &RequestParts,
    params: &[(String, String)],
    secret: &str,
) -> Result<(), SignatureError> {
    mac(secret, &string_to_sign(req.method, params))
        .verify_slice(&proof.signature)
        .map_err(|_| SignatureError::Mismatch)
}

fn mac(secret: &str, string_to_sign: &str) -> Hmac<Sha1> {
    let mut mac = Hmac::<Sha1>::new_from_slice(format!("{secret}&").as_bytes())
        .expect("HMAC takes keys of any length");
    mac.update(string_to_sign.as_bytes());
    mac
}

/// `METHOD&%2F&percentEncode(canonicalized)`; `params` must have unique keys.
fn string_to_sign(method: &str, params: &[(String, String)]) -> String {
    let mut sorted: Vec<&(String, String)> =
        params.iter().filter(|(k, _)| k != "Signature").collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let canonical: Vec<String> = sorted
        .iter()
        .map(|(k, v)| format!("{}={}", percent_encode(k), percent_encode(v)))
        .collect();
    format!("{method}&%2F&{}", percent_encode(&canonical.join("&")))
}

/// Signs an RPC request with V2 `HMAC-SHA1` and returns the complete query string (no
/// leading `?`) to send with `method` to path `/`: `params` (the action's parameters,
/// usually including `Action`, `Version` and `Format`) plus `AccessKeyId`,
/// `SignatureMethod`, `SignatureVersion`, `SignatureNonce`, `Timestamp` (from `now`),
/// sorted by key and percent-encoded, with `Signature` last. A key repeated in `params`
/// keeps its last value; a `Signature` in `params` is ignored.
pub fn sign_v2(
    method: &str,
    params: &[(&str, &str)],
    access_key_id: &str,
    secret: &str,
    now: DateTime<Utc>,
    nonce: &str,
) -> String {
    let mut all: Vec<(String, String)> = params
        .iter()
        .filter(|(k, _)| *k != "Signature")
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    all.extend(
        [
            ("AccessKeyId", access_key_id.to_owned()),
            ("SignatureMethod", "HMAC-SHA1".to_owned()),
            ("SignatureVersion", "1.0".to_owned()),
            ("SignatureNonce", nonce.to_owned()),
            ("Timestamp", format_timestamp(now)),
        ]
        .map(|(k, v)| (k.to_owned(), v)),
    );
    let mut all = last_wins(all);
    let signature = STANDARD.encode(
        mac(secret, &string_to_sign(method, &all))
            .finalize()
            .into_bytes(),
    );
    all.sort_by(|a, b| a.0.cmp(&b.0));
    all.push(("Signature".to_owned(), signature));
    let pairs: Vec<String> = all
        .iter()
        .map(|(k, v)| format!("{}={}", percent_encode(k), percent_encode(v)))
        .collect();
    pairs.join("&")
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 3, 4, 5, 6, 7).unwrap()
    }

    const PARAMS: [(&str, &str); 4] = [
        ("Action", "DescribeBackups"),
        ("Version", "2014-08-15"),
        ("DBName", "a b+c*d~e/é"),
        ("Format", "json"),
    ];

    fn get(query: &str) -> RequestParts<'_> {
        RequestParts {
            method: "GET",
            path: "/",
            raw_query: query,
            headers: &[],
            body: b"",
        }
    }

    #[test]
    fn sign_v2_matches_sdk_value() {
        // Expected signature computed with the official Python SDK's
        // `Utils.get_rpcsignature` for the same parameters.
        let query = sign_v2("GET", &PARAMS, "AKID", "s3cr3t", now(), "nonce-1");
        assert_eq!(
            query,
            "AccessKeyId=AKID&Action=DescribeBackups&DBName=a%20b%2Bc%2Ad~e%2F%C3%A9&Format=json\
             &SignatureMethod=HMAC-SHA1&SignatureNonce=nonce-1&SignatureVersion=1.0\
             &Timestamp=2026-03-04T05%3A06%3A07Z&Version=2014-08-15&Signature=wJB255hEcg8HogY3S6mcz882Nhc%3D"
        );
    }

    #[test]
    fn sign_then_verify_round_trip() {
        let query = sign_v2("GET", &PARAMS, "AKID", "s3cr3t", now(), "nonce-1");
        let req = get(&query);
        let claim = crate::parse(&req).unwrap();
        assert_eq!(claim.version, SignatureVersion::V2);
        assert_eq!(claim.access_key_id, "AKID");
        assert_eq!(claim.nonce, "nonce-1");
        assert_eq!(claim.timestamp, now());
        assert_eq!(claim.verify(&req, "s3cr3t").map(drop), Ok(()));
        assert_eq!(claim.verify(&req, "s3cr3t-"), Err(SignatureError::Mismatch));
        let post = RequestParts {
            method: "POST",
            ..req
        };
        assert_eq!(claim.verify(&post, "s3cr3t"), Err(SignatureError::Mismatch));
        let tampered = query.replace("Format=json", "Format=xml");
        assert_eq!(
            claim.verify(&get(&tampered), "s3cr3t"),
            Err(SignatureError::Mismatch)
        );
        let extra = format!("{query}&PageSize=100");
        assert_eq!(
            claim.verify(&get(&extra), "s3cr3t"),
            Err(SignatureError::Mismatch)
        );
        // Spaces may arrive as `+` instead of `%20`: same parameters.
        let plus = query.replace("a%20b", "a+b");
        assert_eq!(claim.verify(&get(&plus), "s3cr3t").map(drop), Ok(()));
    }

    #[test]
    fn sign_v2_overrides_reserved_params() {
        let query = sign_v2(
            "GET",
            &[
                ("Signature", "x"),
                ("Timestamp", "old"),
                ("A", "1"),
                ("A", "2"),
            ],
            "AK",
            "s",
            now(),
            "n",
        );
        assert!(query.starts_with("A=2&AccessKeyId=AK&SignatureMethod=HMAC-SHA1&SignatureNonce=n&SignatureVersion=1.0&Timestamp=2026-03-04T05%3A06%3A07Z&Signature="), "{query}");
        assert_eq!(query.matches("Signature=").count(), 1);
        let req = get(&query);
        assert_eq!(
            crate::parse(&req).unwrap().verify(&req, "s").map(drop),
            Ok(())
        );
    }

    #[test]
    fn signature_in_form_body() {
        let query = sign_v2("POST", &PARAMS, "AKID", "s3cr3t", now(), "nonce-1");
        let form = vec![(
            "content-type".to_owned(),
            "application/x-www-form-urlencoded".to_owned(),
        )];
        let req = RequestParts {
            method: "POST",
            path: "/",
            raw_query: "",
            headers: &form,
            body: query.as_bytes(),
        };
        let claim = crate::parse(&req).unwrap();
        assert_eq!(claim.verify(&req, "s3cr3t").map(drop), Ok(()));
        // The same body without the form content type carries no parameters at all.
        let req = RequestParts {
            headers: &[],
            ..req
        };
        assert_eq!(crate::parse(&req).unwrap_err(), SignatureError::Unsigned);
    }

    #[test]
    fn missing_or_bad_parameters() {
        let query = sign_v2("GET", &PARAMS, "AKID", "s3cr3t", now(), "nonce-1");
        for name in [
            "AccessKeyId",
            "SignatureMethod",
            "SignatureVersion",
            "SignatureNonce",
            "Timestamp",
        ] {
            let without: Vec<&str> = query
                .split('&')
                .filter(|p| !p.starts_with(&format!("{name}=")))
                .collect();
            let without = without.join("&");
            assert_eq!(
                crate::parse(&get(&without)).unwrap_err(),
                SignatureError::Malformed(format!("missing parameter {name}")),
                "{name}"
            );
            let empty = query.replacen(&format!("{name}="), &format!("{name}=&Ignored="), 1);
            assert!(
                matches!(
                    crate::parse(&get(&empty)),
                    Err(SignatureError::Malformed(_))
                ),
                "{name}"
            );
        }
        let empty_sig = "Signature=&AccessKeyId=a";
        assert_eq!(
            crate::parse(&get(empty_sig)).unwrap_err(),
            SignatureError::Malformed("missing parameter Signature".into())
        );
        assert_eq!(
            crate::parse(&get(&query.replace("HMAC-SHA1", "HMAC-SHA256"))).unwrap_err(),
            SignatureError::UnsupportedAlgorithm("SignatureMethod=HMAC-SHA256".into())
        );
        assert_eq!(
            crate::parse(&get(
                &query.replace("SignatureVersion=1.0", "SignatureVersion=2.0")
            ))
            .unwrap_err(),
            SignatureError::UnsupportedAlgorithm("SignatureVersion=2.0".into())
        );
        assert_eq!(
            crate::parse(&get(&query.replace("Signature=", "Signature=%21%21"))).unwrap_err(),
            SignatureError::Malformed("parameter Signature is not base64".into())
        );
        assert_eq!(
            crate::parse(&get(
                &query.replace("2026-03-04T05%3A06%3A07Z", "1772600767")
            ))
            .unwrap_err(),
            SignatureError::TimestampFormat("1772600767".into())
        );
    }
}
