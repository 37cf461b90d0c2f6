//! Fuzz target for `TableMeta`, the JSON an API caller sends to
//! RestoreTable: the seeds in `fuzz-corpus/table_meta/`, then mutations of
//! them (the shared harness in `testkit::fuzz`). The parser must never
//! panic, and whatever it accepts must hold only names PostgreSQL keeps as
//! given. Longer run:
//! `STRATA_FUZZ_CASES=1000000 cargo test -p strata-service --test fuzz`.

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
    let dir = env!("CARGO_MANIFEST_DIR");
    // The seeds are requests RestoreTable accepts, so mutations start from
    // the shapes that reach every check.
    for seed in testkit::fuzz::corpus(dir, "table_meta") {
        let text = String::from_utf8_lossy(&seed);
        assert!(strata_service::parse_table_meta(&text).is_ok(), "{text}");
    }
    testkit::fuzz::run(dir, "table_meta", check);
}

#[global_allocator]
static ALLOCATOR: testkit::fuzz::CappedAlloc = testkit::fuzz::CappedAlloc;
