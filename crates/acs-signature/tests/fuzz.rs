//! Fuzz targets for everything this crate reads from a client: query strings and form
//! bodies (splitting, percent-decoding, repeated names), the `Authorization` header, and
//! the canonical forms both signature versions compute over a request.
//!
//! Each target feeds its seed corpus (`fuzz-corpus/<target>/`, requests captured from the
//! official Python SDK plus a few edge cases) and then mutations of those seeds: bit
//! flips, truncations, removals, insertions of URL syntax (`%`, `+`, `=`, `&`, broken
//! escapes, a second `Action=`), splices of two seeds, random bytes. The number of
//! mutated cases is `STRATA_FUZZ_CASES` (default 512, a few seconds); a longer run:
//!
//! ```text
//! STRATA_FUZZ_CASES=1000000 cargo test --release -p acs-signature --test fuzz
//! ```
//!
//! Properties: nothing panics; decoded parameters have unique names and survive
//! re-encoding; a claim that parses is complete; and a mutated signed request that still
//! verifies asks for exactly what the original signed (same action, version and
//! parameters): whatever the signature does not cover cannot change what runs.

use std::fmt::Debug;
use std::path::{Path, PathBuf};

use acs_signature::{
    parse, percent_encode, request_params, sign_v3, RequestParts, SignatureError, SignatureVersion,
    SignedCall,
};
use chrono::{TimeZone, Utc};
use proptest::prelude::*;
use proptest::sample::select;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::Value;

/// Mutated cases per target.
fn cases() -> u32 {
    std::env::var("STRATA_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(512)
}

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz-corpus")
        .join(target)
}

/// Every file of a target's corpus, in name order.
fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = corpus_dir(target);
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    paths.sort();
    let seeds: Vec<Vec<u8>> = paths.iter().map(|p| std::fs::read(p).unwrap()).collect();
    assert!(seeds.len() >= 3, "{}: too few seeds", dir.display());
    seeds
}

/// Bytes that mean something in a query string, a form body or a header list.
const TOKENS: &[&str] = &[
    "%",
    "%2",
    "%zz",
    "%25",
    "%00",
    "%0D%0A",
    "%C3",
    "%C3%A9",
    "%FF",
    "%41",
    "%2B",
    "%7e",
    "+",
    "=",
    "&",
    "&&",
    "==",
    ";",
    ",",
    " ",
    "\t",
    "\r\n",
    "Action=",
    "Action=DeleteBackup&",
    "&Action=DeleteBackup",
    "Version=2013-05-28&",
    "Signature=",
    "a=1&a=2",
    "Credential=",
    "SignedHeaders=",
    "host;",
    "x-acs-action;",
    "ACS3-HMAC-SHA256 ",
    "é",
];

#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Truncate(usize),
    Remove(usize, usize),
    Insert(usize, Vec<u8>),
    /// `len` bytes of seed `from` at `from_at`, inserted at `at`.
    Splice {
        from: usize,
        from_at: usize,
        len: usize,
        at: usize,
    },
    Replace(Vec<u8>),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let token = prop_oneof![
        3 => select(TOKENS).prop_map(|t| t.as_bytes().to_vec()),
        1 => prop::collection::vec(any::<u8>(), 1..8),
    ];
    prop_oneof![
        4 => (any::<usize>(), 0u8..8).prop_map(|(at, bit)| Mutation::Flip(at, bit)),
        1 => any::<usize>().prop_map(Mutation::Truncate),
        2 => (any::<usize>(), 1usize..16).prop_map(|(at, n)| Mutation::Remove(at, n)),
        4 => (any::<usize>(), token).prop_map(|(at, t)| Mutation::Insert(at, t)),
        2 => (any::<usize>(), any::<usize>(), 1usize..64, any::<usize>())
            .prop_map(|(from, from_at, len, at)| Mutation::Splice { from, from_at, len, at }),
        1 => prop::collection::vec(any::<u8>(), 0..64).prop_map(Mutation::Replace),
    ]
}

/// Up to 6 mutations of one seed (none: the seed itself).
fn mutations() -> impl Strategy<Value = Vec<Mutation>> {
    prop::collection::vec(mutation(), 0..6)
}

fn apply(seed: &[u8], mutations: &[Mutation], seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut out = seed.to_vec();
    let at = |i: usize, len: usize| if len == 0 { 0 } else { i % (len + 1) };
    for m in mutations {
        match m {
            Mutation::Flip(i, bit) if !out.is_empty() => {
                let i = i % out.len();
                out[i] ^= 1 << bit;
            }
            Mutation::Flip(..) => {}
            Mutation::Truncate(i) => out.truncate(at(*i, out.len())),
            Mutation::Remove(i, n) => {
                let start = at(*i, out.len());
                let end = (start + n).min(out.len());
                out.drain(start..end);
            }
            Mutation::Insert(i, bytes) => {
                let i = at(*i, out.len());
                out.splice(i..i, bytes.iter().copied());
            }
            Mutation::Splice {
                from,
                from_at,
                len,
                at: i,
            } => {
                let other = &seeds[from % seeds.len()];
                let start = at(*from_at, other.len());
                let end = (start + len).min(other.len());
                let i = at(*i, out.len());
                out.splice(i..i, other[start..end].iter().copied());
            }
            Mutation::Replace(bytes) => out = bytes.clone(),
        }
    }
    out
}

/// Runs `check` on every seed, then on `cases()` mutated seeds.
fn fuzz<T: Debug + Clone>(
    target: &str,
    seeds: &[T],
    strategy: impl Strategy<Value = T>,
    check: impl Fn(&T) -> Result<(), TestCaseError>,
) {
    for (i, seed) in seeds.iter().enumerate() {
        check(seed).unwrap_or_else(|e| panic!("{target}: seed {i}: {e}"));
    }
    let mut runner = TestRunner::new(Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&strategy, |input| check(&input))
        .unwrap_or_else(|e| panic!("{target}: {e}"));
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn form_header() -> Vec<(String, String)> {
    vec![(
        "content-type".to_owned(),
        "application/x-www-form-urlencoded".to_owned(),
    )]
}

/// Decoded parameters have unique names and re-encode to themselves; anything else is
/// a typed refusal.
fn check_params(
    query: &str,
    headers: &[(String, String)],
    body: &[u8],
) -> Result<(), TestCaseError> {
    let req = RequestParts {
        method: "POST",
        path: "/",
        raw_query: query,
        headers,
        body,
    };
    match request_params(&req) {
        Ok(pairs) => {
            let mut names: Vec<&str> = pairs.iter().map(|(k, _)| k.as_str()).collect();
            names.sort_unstable();
            let before = names.len();
            names.dedup();
            prop_assert_eq!(before, names.len(), "repeated name in {:?}", pairs);
            let encoded: Vec<String> = pairs
                .iter()
                .map(|(k, v)| format!("{}={}", percent_encode(k), percent_encode(v)))
                .collect();
            let encoded = encoded.join("&");
            let again = request_params(&RequestParts {
                raw_query: &encoded,
                headers: &[],
                body: b"",
                ..req
            });
            // An empty name re-encodes to a segment the parser reads back alike.
            prop_assert_eq!(again.as_ref(), Ok(&pairs), "re-encoded as {:?}", encoded);
            Ok(())
        }
        Err(SignatureError::Malformed(_) | SignatureError::DuplicateParameter(_)) => Ok(()),
        Err(other) => Err(TestCaseError::fail(format!("unexpected error {other:?}"))),
    }
}

#[test]
fn fuzz_request_params() {
    let seeds = corpus("request_params");
    let inputs: Vec<(usize, Vec<Mutation>)> = (0..seeds.len()).map(|i| (i, Vec::new())).collect();
    let strategy = (0..seeds.len(), mutations());
    fuzz("request_params", &inputs, strategy, |(i, muts)| {
        let bytes = apply(&seeds[*i], muts, &seeds);
        check_params(&lossy(&bytes), &[], b"")?;
        check_params("", &form_header(), &bytes)?;
        // The same bytes in both places: every name is repeated unless the text is empty.
        check_params(&lossy(&bytes), &form_header(), lossy(&bytes).as_bytes())
    });
}

/// The headers of a V3 request around a fuzzed `Authorization` value.
fn v3_headers(authorization: &str) -> Vec<(String, String)> {
    [
        ("host", "rds.example.com"),
        ("x-acs-action", "DescribeBackups"),
        ("x-acs-version", "2014-08-15"),
        ("x-acs-date", "2026-03-04T05:06:07Z"),
        ("x-acs-signature-nonce", "n1"),
        ("authorization", authorization),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

#[test]
fn fuzz_authorization_header() {
    let seeds = corpus("authorization");
    let inputs: Vec<(usize, Vec<Mutation>)> = (0..seeds.len()).map(|i| (i, Vec::new())).collect();
    let strategy = (0..seeds.len(), mutations());
    fuzz("authorization", &inputs, strategy, |(i, muts)| {
        let value = lossy(&apply(&seeds[*i], muts, &seeds));
        let headers = v3_headers(&value);
        let req = RequestParts {
            method: "POST",
            path: "/",
            raw_query: "",
            headers: &headers,
            body: b"",
        };
        match parse(&req) {
            Ok(claim) => {
                prop_assert_eq!(claim.version, SignatureVersion::V3);
                prop_assert!(!claim.access_key_id.is_empty());
                prop_assert_eq!(claim.nonce.as_str(), "n1");
                // No seed carries a signature of this request: it cannot verify.
                prop_assert!(claim.verify(&req, "secret-example").is_err());
            }
            Err(SignatureError::Mismatch | SignatureError::BodyHashMismatch) => {
                return Err(TestCaseError::fail("parse compared a signature"));
            }
            Err(_) => {}
        }
        Ok(())
    });
}

/// One captured SDK request.
#[derive(Debug, Clone)]
struct Captured {
    secret: String,
    method: String,
    path: String,
    raw_query: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Captured {
    fn from_json(bytes: &[u8]) -> Captured {
        let v: Value = serde_json::from_slice(bytes).expect("seed is JSON");
        let r = &v["request"];
        let s = |v: &Value, k: &str| v[k].as_str().expect(k).to_owned();
        Captured {
            secret: s(&v, "access_key_secret"),
            method: s(r, "method"),
            path: s(r, "path"),
            raw_query: s(r, "raw_query"),
            headers: r["headers"]
                .as_array()
                .expect("headers")
                .iter()
                .map(|h| {
                    (
                        h[0].as_str().unwrap().to_owned(),
                        h[1].as_str().unwrap().to_owned(),
                    )
                })
                .collect(),
            body: s(r, "body").into_bytes(),
        }
    }

    fn req(&self) -> RequestParts<'_> {
        RequestParts {
            method: &self.method,
            path: &self.path,
            raw_query: &self.raw_query,
            headers: &self.headers,
            body: &self.body,
        }
    }

    fn call(&self) -> Result<SignedCall, SignatureError> {
        let req = self.req();
        parse(&req)?.verify(&req, &self.secret)
    }
}

/// What a request runs, with the parameters in a fixed order.
fn normalized(mut call: SignedCall) -> SignedCall {
    call.params.sort();
    call
}

/// An `x-acs-action` header to put on the request (replacing the SDK's), if any.
fn header_action() -> impl Strategy<Value = Option<&'static str>> {
    prop::option::of(select(
        &["DeleteBackup", "DescribeBackups", "CreateBackup", ""][..],
    ))
}

#[test]
fn fuzz_signed_request() {
    let seeds = corpus("signed_request");
    let requests: Vec<Captured> = seeds.iter().map(|s| Captured::from_json(s)).collect();
    let originals: Vec<SignedCall> = requests
        .iter()
        .map(|r| normalized(r.call().expect("a captured SDK request verifies")))
        .collect();
    let queries: Vec<Vec<u8>> = requests
        .iter()
        .map(|r| r.raw_query.clone().into_bytes())
        .collect();
    let bodies: Vec<Vec<u8>> = requests.iter().map(|r| r.body.clone()).collect();
    let inputs: Vec<_> = (0..requests.len())
        .map(|i| (i, Vec::new(), Vec::new(), None))
        .collect();
    let strategy = (0..requests.len(), mutations(), mutations(), header_action());
    fuzz(
        "signed_request",
        &inputs,
        strategy,
        |(i, query_muts, body_muts, action)| {
            let mut req = requests[*i].clone();
            req.raw_query = lossy(&apply(&queries[*i], query_muts, &queries));
            req.body = apply(&bodies[*i], body_muts, &bodies);
            if let Some(action) = action {
                req.headers
                    .retain(|(k, _)| !k.eq_ignore_ascii_case("x-acs-action"));
                req.headers
                    .push(("x-acs-action".to_owned(), (*action).to_owned()));
            }
            if let Ok(call) = req.call() {
                prop_assert_eq!(
                    &normalized(call),
                    &originals[*i],
                    "a changed request verified: query {:?}",
                    req.raw_query
                );
            }
            // Canonicalisation round trip: what this crate signs, it verifies, and the
            // verified parameters are the request's own.
            let mut fresh = req.clone();
            fresh.headers.retain(|(k, _)| {
                let k = k.to_ascii_lowercase();
                !matches!(
                    k.as_str(),
                    "authorization"
                        | "x-acs-date"
                        | "x-acs-signature-nonce"
                        | "x-acs-content-sha256"
                )
            });
            let now = Utc.with_ymd_and_hms(2026, 3, 4, 5, 6, 7).unwrap();
            if let Ok(added) = sign_v3(&fresh.req(), "AK", "fuzz-secret", now, "n") {
                fresh.headers.extend(added);
                fresh.secret = "fuzz-secret".to_owned();
                match (fresh.call(), request_params(&fresh.req())) {
                    (Ok(call), Ok(params)) => prop_assert_eq!(call.params, params),
                    (Err(e), Err(p)) => prop_assert_eq!(e, p),
                    (Err(SignatureError::Conflict { .. }), Ok(_)) => {}
                    (call, params) => {
                        return Err(TestCaseError::fail(format!(
                            "signed request: verify {call:?}, params {params:?}"
                        )))
                    }
                }
            }
            Ok(())
        },
    );
}
