//! Percent-encoding and parameter decoding shared by both signature versions.
//!
//! Encoding is RFC 3986: the unreserved characters `A-Z a-z 0-9 - _ . ~` stay, every
//! other UTF-8 byte becomes `%XX` with upper-case hex. This is what the official SDKs
//! sign (Python: `quote(s, safe='~')`). Decoding is `application/x-www-form-urlencoded`:
//! `%XX` escapes and `+` for a space, because the SDK builds its query strings and form
//! bodies with Python's `urlencode`, which writes a space as `+` and a plus as `%2B`.

use crate::error::shown;
use crate::{RequestParts, SignatureError};

const FORM_URLENCODED: &str = "application/x-www-form-urlencoded";

/// RFC 3986 percent-encoding as used by both algorithms: unreserved characters
/// (`A-Za-z0-9-_.~`) are kept, every other byte of the UTF-8 text becomes `%XX`
/// (upper-case hex). A space is `%20`, never `+`.
pub fn percent_encode(s: &str) -> String {
    encode_bytes(s.as_bytes(), false)
}

/// Like [`percent_encode`] but keeps `/`, for the V3 canonical URI.
pub(crate) fn encode_path(raw: &[u8]) -> String {
    encode_bytes(raw, true)
}

fn encode_bytes(bytes: &[u8], keep_slash: bool) -> String {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = String::with_capacity(bytes.len() * 3);
    for &b in bytes {
        if b.is_ascii_alphanumeric()
            || matches!(b, b'-' | b'_' | b'.' | b'~')
            || (keep_slash && b == b'/')
        {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0x0f)]));
        }
    }
    out
}

/// Decodes `%XX` escapes (and `+` as a space when `plus_is_space`). `None` when an
/// escape is not followed by two hex digits.
pub(crate) fn percent_decode(s: &str, plus_is_space: bool) -> Option<Vec<u8>> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hi = hex_value(*bytes.get(i + 1)?)?;
                let lo = hex_value(*bytes.get(i + 2)?)?;
                out.push(hi << 4 | lo);
                i += 3;
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    Some(out)
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Splits a raw `k=v&k2=v2` string (query or form body) into decoded pairs, in order.
/// Empty segments are skipped; a segment without `=` is a key with an empty value.
pub(crate) fn parse_urlencoded(
    raw: &str,
    what: &str,
) -> Result<Vec<(String, String)>, SignatureError> {
    let decode = |part: &str| -> Result<String, SignatureError> {
        let bytes = percent_decode(part, true).ok_or_else(|| {
            SignatureError::Malformed(format!(
                "invalid percent-encoding in {what}: {}",
                shown(part)
            ))
        })?;
        String::from_utf8(bytes).map_err(|_| {
            SignatureError::Malformed(format!("{what} does not decode to UTF-8: {}", shown(part)))
        })
    };
    raw.split('&')
        .filter(|segment| !segment.is_empty())
        .map(|segment| {
            let (k, v) = segment.split_once('=').unwrap_or((segment, ""));
            Ok((decode(k)?, decode(v)?))
        })
        .collect()
}

/// All parameters of an RPC request: the query string, then the body when the request's
/// `content-type` is `application/x-www-form-urlencoded` (parameters may be like
/// `; charset=utf-8`), decoded (`%XX`, and `+` as a space), in order. The `Signature`
/// parameter is included.
///
/// A name given twice (in the query, in the body, or once in each) is refused with
/// [`SignatureError::DuplicateParameter`]: V3 sorts repeated names by value before
/// signing, so their order is not covered and "which one wins" would be the sender's
/// choice after signing. With every name unique, the pairs returned are exactly the
/// signed set under both versions.
///
/// Exposed because the server needs the very decoding the signature covers for the
/// action's own parameters; prefer the [`crate::SignedCall`] that
/// [`crate::Claim::verify`] returns.
pub fn request_params(req: &RequestParts) -> Result<Vec<(String, String)>, SignatureError> {
    let mut pairs = parse_urlencoded(req.raw_query, "query string")?;
    if is_form(req)? {
        let body = std::str::from_utf8(req.body)
            .map_err(|_| SignatureError::Malformed("form body is not UTF-8".to_owned()))?;
        pairs.extend(parse_urlencoded(body, "form body")?);
    }
    refuse_duplicates(&pairs)?;
    Ok(pairs)
}

/// Refuses a list of pairs in which a name occurs twice.
fn refuse_duplicates(pairs: &[(String, String)]) -> Result<(), SignatureError> {
    let mut names: Vec<&str> = pairs.iter().map(|(k, _)| k.as_str()).collect();
    names.sort_unstable();
    match names.windows(2).find(|w| w[0] == w[1]) {
        Some(w) => Err(SignatureError::DuplicateParameter(shown(w[0]))),
        None => Ok(()),
    }
}

fn is_form(req: &RequestParts) -> Result<bool, SignatureError> {
    Ok(req.single_header("content-type")?.is_some_and(|ct| {
        let media_type = ct.split(';').next().unwrap_or("").trim();
        media_type.eq_ignore_ascii_case(FORM_URLENCODED)
    }))
}

/// Keeps the first position and the last value of each key (for signing only: a server
/// refuses repeated names, see [`request_params`]).
pub(crate) fn last_wins(pairs: Vec<(String, String)>) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::with_capacity(pairs.len());
    for (k, v) in pairs {
        match out.iter_mut().find(|(existing, _)| *existing == k) {
            Some(slot) => slot.1 = v,
            None => out.push((k, v)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req<'a>(
        query: &'a str,
        headers: &'a [(String, String)],
        body: &'a [u8],
    ) -> RequestParts<'a> {
        RequestParts {
            method: "POST",
            path: "/",
            raw_query: query,
            headers,
            body,
        }
    }

    #[test]
    fn percent_encode_is_rfc3986() {
        assert_eq!(percent_encode("AZaz09-_.~"), "AZaz09-_.~");
        assert_eq!(percent_encode("a b+c*d~e/é"), "a%20b%2Bc%2Ad~e%2F%C3%A9");
        assert_eq!(percent_encode("2026-01-01T00:00Z"), "2026-01-01T00%3A00Z");
        assert_eq!(percent_encode("=&%"), "%3D%26%25");
        assert_eq!(percent_encode(""), "");
        assert_eq!(percent_encode("日"), "%E6%97%A5");
        assert_eq!(encode_path(b"/a b/c~"), "/a%20b/c~");
    }

    #[test]
    fn decode_handles_plus_and_escapes() {
        assert_eq!(percent_decode("a+b%2Bc%2a", true).unwrap(), b"a b+c*");
        assert_eq!(percent_decode("a+b", false).unwrap(), b"a+b");
        assert_eq!(percent_decode("%C3%A9", true).unwrap(), "é".as_bytes());
        assert!(percent_decode("%4", true).is_none());
        assert!(percent_decode("%zz", true).is_none());
    }

    #[test]
    fn parse_urlencoded_pairs() {
        let pairs = parse_urlencoded("a=1&&b=&c&d=x%3Dy=z", "q").unwrap();
        let expected: Vec<(String, String)> = [("a", "1"), ("b", ""), ("c", ""), ("d", "x=y=z")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(pairs, expected);
        assert!(
            matches!(parse_urlencoded("a=%ff", "q"), Err(SignatureError::Malformed(m)) if m.contains("UTF-8"))
        );
        assert!(
            matches!(parse_urlencoded("a=%f", "q"), Err(SignatureError::Malformed(m)) if m.contains("percent"))
        );
    }

    #[test]
    fn request_params_merges_query_and_form_body() {
        let form = vec![(
            "Content-Type".to_owned(),
            "application/x-www-form-urlencoded; charset=utf-8".to_owned(),
        )];
        let r = req("A=1&B=q", &form, b"D=body+value&C=%2B");
        let got = request_params(&r).unwrap();
        assert_eq!(
            got,
            vec![
                ("A".into(), "1".into()),
                ("B".into(), "q".into()),
                ("D".into(), "body value".into()),
                ("C".into(), "+".into())
            ]
        );
    }

    #[test]
    fn request_params_refuses_repeated_names() {
        let form = vec![(
            "content-type".to_owned(),
            "application/x-www-form-urlencoded".to_owned(),
        )];
        let dup = |e: Result<_, _>| match e {
            Err(SignatureError::DuplicateParameter(name)) => name,
            other => panic!("{other:?}"),
        };
        // In the query, in the body, across both, under two spellings of one name.
        assert_eq!(dup(request_params(&req("A=1&B=2&A=1", &[], b""))), "A");
        assert_eq!(dup(request_params(&req("", &form, b"X=1&X=2"))), "X");
        assert_eq!(
            dup(request_params(&req("Action=A", &form, b"Action=B"))),
            "Action"
        );
        assert_eq!(dup(request_params(&req("%41=1&A=2", &[], b""))), "A");
        assert_eq!(
            dup(request_params(&req("Signature=a&Signature", &[], b""))),
            "Signature"
        );
        // Names differing in case are different names.
        assert_eq!(request_params(&req("a=1&A=2", &[], b"")).unwrap().len(), 2);
    }

    #[test]
    fn request_params_ignores_non_form_body() {
        let json = vec![("content-type".to_owned(), "application/json".to_owned())];
        let r = req("A=1", &json, b"B=2");
        assert_eq!(request_params(&r).unwrap(), vec![("A".into(), "1".into())]);
        let r = req("A=1", &[], b"B=2");
        assert_eq!(request_params(&r).unwrap(), vec![("A".into(), "1".into())]);
    }
}
