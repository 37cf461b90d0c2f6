//! Retention from the command line against a real PostgreSQL 15 server: a
//! set kept by hand outlives its retention (the dry run says why), the
//! retention pass leaves it and its data in the repository (a reindex
//! keeps the keep), and once released the next pass deletes it.

mod common;

use chrono::{Duration, Utc};
use common::Strata;
use strata_catalog::prelude::*;
use strata_catalog::SqliteCatalog;
use testkit::Cluster;

/// Moves every set of `id` back by `days`, as if taken that long ago.
fn age_sets(strata: &Strata, id: &str, days: i64) {
    let catalog = SqliteCatalog::open(&strata.dir.join("data/catalog.db")).unwrap();
    for mut b in catalog.list_backups(id).unwrap() {
        b.started_at -= Duration::days(days);
        b.finished_at = b.finished_at.map(|t| t - Duration::days(days));
        catalog.update_backup(&b).unwrap();
    }
}

fn dry_run(strata: &Strata, id: &str, at: Option<&str>) -> Vec<serde_json::Value> {
    let mut args = vec!["repo", "retention", "--dry-run", "--json", "--instance", id];
    if let Some(at) = at {
        args.extend(["--at", at]);
    }
    let out: serde_json::Value = serde_json::from_str(&strata.ok(&args)).unwrap();
    out[0]["sets"].as_array().unwrap().clone()
}

fn decision<'a>(sets: &'a [serde_json::Value], backup: &str) -> &'a serde_json::Value {
    sets.iter()
        .find(|s| s["backup_id"] == backup)
        .unwrap_or_else(|| panic!("{backup} not in {sets:?}"))
}

#[test]
fn a_kept_set_outlives_retention_until_released() {
    let pg = Cluster::builder(15).start();
    pg.psql(
        "postgres",
        "CREATE TABLE t AS SELECT g FROM generate_series(1, 1000) g",
    );
    let strata = Strata::new("retention");
    strata.add_instance("db", &pg);
    let old = strata.backup("db");
    pg.psql(
        "postgres",
        "INSERT INTO t SELECT generate_series(1001, 2000)",
    );
    let newest = strata.backup("db");

    // A keep until a time gone by, or with a note on two lines, is refused.
    let err = strata.fails(&["backup", "keep", "db", &old, "--until", "2020-01-01"]);
    assert!(err.contains("time to come"), "{err}");
    strata.fails(&["backup", "keep", "db", &old, "--note", "a\nb"]);
    let out = strata.ok(&["backup", "keep", "db", &old, "--note", "audit 2026"]);
    assert!(out.contains("until released"), "{out}");
    // The keep is the catalog's: a rebuild of the index from the
    // repository carries it over.
    strata.ok(&["repo", "reindex"]);
    let list = strata.backups("db");
    let kept = list.iter().find(|b| b["id"] == old.as_str()).unwrap();
    assert_eq!(kept["keep_until"], "forever");
    assert_eq!(kept["keep_note"], "audit 2026");
    assert_eq!(kept["kept_by"], "kept forever (audit 2026)");
    assert_eq!(kept["expires_at"], serde_json::Value::Null);
    let table = strata.ok(&["backup", "list", "db"]);
    assert!(
        table.contains("kept by kept forever (audit 2026)"),
        "{table}"
    );

    // A month from now, by the default 7-day retention: the kept set and
    // the newest one stay, each for its own reason.
    let month = (Utc::now() + Duration::days(30)).to_rfc3339();
    let sets = dry_run(&strata, "db", Some(&month));
    assert_eq!(decision(&sets, &old)["delete"], false);
    assert_eq!(
        decision(&sets, &old)["kept_by"],
        "kept forever (audit 2026)"
    );
    assert_eq!(decision(&sets, &newest)["kept_by"], "newest");

    // The sets really are a month old: the retention pass leaves the kept one.
    age_sets(&strata, "db", 30);
    let out = strata.ok(&["repo", "retention", "--instance", "db"]);
    assert!(out.contains("deleted 0 backup set(s)"), "{out}");
    assert_eq!(strata.backups("db").len(), 2);
    strata.ok(&["backup", "show", "db", &old]);

    // Released, it goes at the next pass: from the catalog and the repository.
    strata.ok(&["backup", "release", "db", &old]);
    let sets = dry_run(&strata, "db", None);
    assert_eq!(decision(&sets, &old)["delete"], true);
    assert_eq!(decision(&sets, &old)["kept_by"], "regular 7 days");
    let out = strata.ok(&["repo", "retention", "--instance", "db"]);
    assert!(out.contains("deleted 1 backup set(s)"), "{out}");
    let left: Vec<String> = strata
        .backups("db")
        .iter()
        .map(|b| b["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(left, vec![newest.clone()]);
    strata.fails(&["backup", "show", "db", &old]);

    // The newest set still restores to the data it was taken from.
    let restored = strata.restore_and_start("db", "after-retention", 15, &["--immediate"]);
    assert_eq!(
        restored.psql("postgres", "SELECT count(*), sum(g) FROM t"),
        pg.psql("postgres", "SELECT count(*), sum(g) FROM t")
    );
}
