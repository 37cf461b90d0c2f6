//! Fuzzing of `TableMeta`, the JSON an API caller sends to RestoreTable:
//! the seeds in `fuzz-corpus/table_meta/` as they are, then mutated
//! (bytes flipped, cut, spliced, inserted). The parser must never panic,
//! and whatever it accepts must hold only names PostgreSQL keeps as given.
//!
//! `STRATA_FUZZ_CASES` sets the number of mutated cases (default 512); a
//! longer run: `STRATA_FUZZ_CASES=1000000 cargo test -p strata-service --test fuzz`.

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

/// The seeds, each with whether it must be accepted (files named
/// `refused-*` must not be).
fn seeds() -> Vec<(Vec<u8>, bool)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz-corpus/table_meta");
    let mut out: Vec<(Vec<u8>, bool)> = std::fs::read_dir(&dir)
        .expect("fuzz corpus")
        .map(|e| {
            let path = e.expect("corpus entry").path();
            let refused = path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("refused-"));
            (std::fs::read(&path).expect("corpus file"), !refused)
        })
        .collect();
    out.sort();
    assert!(!out.is_empty(), "no seeds in {}", dir.display());
    out
}

fn cases() -> u32 {
    std::env::var("STRATA_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(512)
}

/// One edit of a seed.
#[derive(Debug, Clone)]
enum Edit {
    Flip(usize, u8),
    Cut(usize),
    Insert(usize, Vec<u8>),
    Splice(usize, usize, usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Edit::Flip(i, b)),
        any::<usize>().prop_map(Edit::Cut),
        (
            any::<usize>(),
            prop_oneof![
                proptest::collection::vec(any::<u8>(), 1..8),
                Just(b"\\u0000".to_vec()),
                Just(b"\",\"newname\":\"".to_vec()),
                Just("é".repeat(40).into_bytes()),
                Just(b"[{\"tables\":[]}]".to_vec()),
            ]
        )
            .prop_map(|(i, b)| Edit::Insert(i, b)),
        (any::<usize>(), any::<usize>(), any::<usize>())
            .prop_map(|(s, a, b)| Edit::Splice(s, a, b)),
    ]
}

fn apply(seeds: &[Vec<u8>], base: usize, edits: &[Edit]) -> Vec<u8> {
    let mut data = seeds[base % seeds.len()].clone();
    for e in edits {
        let at = |i: usize, len: usize| if len == 0 { 0 } else { i % (len + 1) };
        match e {
            Edit::Flip(i, b) if !data.is_empty() => {
                let i = i % data.len();
                data[i] ^= b | 1;
            }
            Edit::Flip(..) => {}
            Edit::Cut(i) => data.truncate(at(*i, data.len())),
            Edit::Insert(i, b) => {
                let i = at(*i, data.len());
                data.splice(i..i, b.iter().copied());
            }
            Edit::Splice(s, a, b) => {
                let other = &seeds[s % seeds.len()];
                let (a, b) = (at(*a, other.len()), at(*b, other.len()));
                let (a, b) = (a.min(b), a.max(b));
                let i = at(*s, data.len());
                data.splice(i..i, other[a..b].iter().copied());
            }
        }
    }
    data
}

fn check(bytes: &[u8]) {
    let text = String::from_utf8_lossy(bytes);
    let Ok(specs) = strata_service::parse_table_meta(&text) else {
        return;
    };
    assert!(!specs.is_empty());
    let fits = |s: &str| !s.is_empty() && s.len() <= 63 && !s.contains('\0');
    let printable = |s: &str| fits(s) && !s.chars().any(char::is_control);
    for d in &specs {
        assert!(fits(&d.name), "{text}");
        assert!(d.newname.as_deref().is_none_or(printable), "{text}");
        assert!(!d.tables.is_empty() || d.newname.is_some(), "{text}");
        for t in &d.tables {
            assert!(printable(&t.newname) && !t.newname.contains('.'), "{text}");
            assert!(
                t.name.split('.').all(fits) || !t.name.contains('.'),
                "{text}"
            );
        }
    }
}

#[test]
fn fuzz_table_meta() {
    let corpus = seeds();
    for (s, accepted) in &corpus {
        check(s);
        let parsed = strata_service::parse_table_meta(&String::from_utf8_lossy(s));
        assert_eq!(parsed.is_ok(), *accepted, "{}", String::from_utf8_lossy(s));
    }
    let seeds: Vec<Vec<u8>> = corpus.into_iter().map(|(s, _)| s).collect();
    let mut runner = TestRunner::new(Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(
            &(any::<usize>(), proptest::collection::vec(edit(), 1..6)),
            |(base, edits)| {
                check(&apply(&seeds, base, &edits));
                Ok(())
            },
        )
        .unwrap();
}
