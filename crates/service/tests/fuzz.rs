//! Fuzz targets for `TableMeta`, the JSON an API caller sends to
//! RestoreTable, and `DbNames` of RecoveryDBInstance and
//! CopyDatabaseBetweenInstances: the seeds in `fuzz-corpus/<target>/`, then
//! mutations of them (the shared harness in `testkit::fuzz`). The parsers
//! must never panic, and whatever they accept must hold only names
//! PostgreSQL keeps as given. Longer run:
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

fn check_db_names(bytes: &[u8]) {
    let text = String::from_utf8_lossy(bytes);
    let Ok(specs) = strata_service::parse_db_names(&text) else {
        return;
    };
    assert!(!specs.is_empty());
    let fits = |s: &str| !s.is_empty() && s.len() <= 63 && !s.contains('\0');
    let mut new_names = std::collections::HashSet::new();
    for d in &specs {
        assert!(fits(&d.name) && d.tables.is_empty(), "{text}");
        let new = d.newname.as_deref().unwrap_or_default();
        assert!(fits(new) && !new.chars().any(char::is_control), "{text}");
        assert!(new_names.insert(new.to_string()), "{text}");
    }
}

#[test]
fn fuzz_db_names() {
    let dir = env!("CARGO_MANIFEST_DIR");
    for seed in testkit::fuzz::corpus(dir, "db_names") {
        let text = String::from_utf8_lossy(&seed);
        assert!(strata_service::parse_db_names(&text).is_ok(), "{text}");
    }
    testkit::fuzz::run(dir, "db_names", check_db_names);
}

#[global_allocator]
static ALLOCATOR: testkit::fuzz::CappedAlloc = testkit::fuzz::CappedAlloc;
