//! Storage usage figures against the bytes really present: backups (with
//! the WAL they store) of a real PostgreSQL 15 into a local repository and
//! into one on the real S3 server, then `strata repo usage --json` compared,
//! figure by figure, with the sizes of the files the repository directory
//! (or the S3 server's bucket directory) holds, by the attribution rule of
//! docs/DESIGN.md: WAL under `instances/<id>/wal/`, the rest of
//! `instances/<id>/` as metadata, packs the instance's manifests reference
//! as its pack bytes, and unreferenced packs plus `strata-repo.json` as
//! nobody's. The same directory measured as another server's cross-region
//! target (`repo usage --region`) gives the same figures.

mod common;

use std::path::Path;

use common::{files_under, Strata};
use testkit::{Cluster, S3Server};

fn size_of(files: &[std::path::PathBuf]) -> u64 {
    files
        .iter()
        .map(|f| std::fs::metadata(f).unwrap().len())
        .sum()
}

/// Two backups with a change between them, a garbage pack beside them, then
/// every figure checked against the files under `root`.
fn figures_match_the_bytes_present(strata: &Strata, root: &Path, id: &str, pg: &Cluster) {
    strata.add_instance(id, pg);
    strata.backup(id);
    pg.psql(
        "postgres",
        &format!("CREATE TABLE usage_{id} AS SELECT g AS n, md5(g::text) AS t FROM generate_series(1, 20000) g"),
    );
    strata.backup(id);

    // A pack no manifest references (as an interrupted backup leaves one).
    let packs = files_under(&root.join("packs"));
    assert!(!packs.is_empty(), "no packs under {}", root.display());
    let garbage = root
        .join("packs/ff")
        .join(format!("{}.pack", "f".repeat(32)));
    std::fs::create_dir_all(garbage.parent().unwrap()).unwrap();
    std::fs::copy(&packs[0], &garbage).unwrap();
    let garbage_bytes = std::fs::metadata(&garbage).unwrap().len();

    let out = strata.ok(&["repo", "usage", "--json"]);
    let usage: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let figure = |name: &str| {
        usage["instances"][id][name]
            .as_u64()
            .unwrap_or_else(|| panic!("no {name}: {usage}"))
    };

    let all: Vec<_> = files_under(root)
        .into_iter()
        .filter(|f| !f.starts_with(root.join("tmp")))
        .collect();
    let instance_dir = root.join("instances").join(id);
    let wal: Vec<_> = files_under(&instance_dir.join("wal"));
    let metadata: Vec<_> = files_under(&instance_dir)
        .into_iter()
        .filter(|f| !f.starts_with(instance_dir.join("wal")))
        .collect();
    assert!(!wal.is_empty(), "the backups stored no WAL");
    assert_eq!(
        metadata
            .iter()
            .filter(|f| f.extension().is_some_and(|e| e == "manifest"))
            .count(),
        2
    );
    let pack_files = files_under(&root.join("packs"));
    let config = std::fs::metadata(root.join("strata-repo.json"))
        .unwrap()
        .len();

    assert_eq!(figure("wal_bytes"), size_of(&wal));
    assert_eq!(figure("metadata_bytes"), size_of(&metadata));
    assert_eq!(figure("pack_bytes"), size_of(&pack_files) - garbage_bytes);
    assert_eq!(figure("backup_sets"), 2);
    assert_eq!(
        usage["unattributed_bytes"].as_u64(),
        Some(garbage_bytes + config)
    );
    assert_eq!(usage["total_bytes"].as_u64(), Some(size_of(&all)));
    assert_eq!(
        figure("pack_bytes")
            + figure("metadata_bytes")
            + figure("wal_bytes")
            + garbage_bytes
            + config,
        size_of(&all),
        "every byte is counted once"
    );
    let logical: u64 = strata
        .backups(id)
        .iter()
        .map(|b| b["total_bytes"].as_u64().unwrap())
        .sum();
    assert_eq!(figure("logical_bytes"), logical);
    // Deduplication and compression: far less stored than the two sets' data.
    assert!(figure("pack_bytes") < logical / 2, "{usage}");
}

#[test]
fn usage_figures_equal_the_bytes_in_local_and_s3_repositories() {
    let pg = Cluster::start_default(15);
    pg.pgbench("postgres", &["-i", "-q", "-s", "1"]);

    let local = Strata::new("usage-local");
    let root = local.repo_dir();
    figures_match_the_bytes_present(&local, &root, "ulocal", &pg);
    // The same directory as a cross-region target of another server: the
    // same figures, measured through `[regions.<id>]`.
    let other = Strata::with_config(
        "usage-region",
        "",
        &format!(
            "[regions.dr]\nrepository = {:?}\n",
            root.display().to_string()
        ),
    );
    assert_eq!(
        other.ok(&["repo", "usage", "--json", "--region", "dr"]),
        local.ok(&["repo", "usage", "--json"])
    );
    let err = other.fails(&["repo", "usage", "--region", "nowhere"]);
    assert!(err.contains("nowhere") && err.contains("dr"), "{err}");

    let s3 = S3Server::start();
    let remote = Strata::on_s3("usage-s3", &s3, "");
    let root = s3.bucket_dir(S3Server::BUCKET).join("usage-s3");
    figures_match_the_bytes_present(&remote, &root, "us3", &pg);
}

#[test]
fn malformed_free_quotas_are_refused_with_the_key() {
    for (section, key) in [
        ("[usage]\nfree_quota = \"lots\"\n", "[usage] free_quota"),
        (
            "[usage.instance_free_quota]\nprod = \"5GB\"\n",
            "[usage] instance_free_quota.prod",
        ),
    ] {
        let strata = Strata::with_config("usage-bad", "", section);
        let err = strata.fails(&["instance", "list"]);
        assert!(err.contains(key) && err.contains("50GiB"), "{err}");
    }
    let fine = Strata::with_config(
        "usage-fine",
        "",
        "[usage]\nfree_quota = \"150%\"\nsample_interval_secs = 60\n[usage.instance_free_quota]\nprod = \"5GiB\"\n",
    );
    fine.ok(&["instance", "list"]);
}
