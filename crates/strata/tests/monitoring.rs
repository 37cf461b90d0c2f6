//! deploy/prometheus and deploy/grafana checked by Prometheus's own tool:
//! the rules load, their unit tests (alerts firing on made-up series, and
//! staying quiet on healthy ones) pass, and every query of the dashboard
//! parses. Which series they name is checked against /metrics by the
//! service's unit tests.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn promtool() -> PathBuf {
    let path = std::env::var_os("STRATA_PROMTOOL")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".cache/prometheus/usr/bin/promtool"));
    assert!(
        path.is_file(),
        "{} is missing: run scripts/install-test-deps.sh (or set STRATA_PROMTOOL)",
        path.display()
    );
    path
}

fn run(args: &[&str], dir: &Path) -> String {
    let out = Command::new(promtool())
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

#[test]
fn alerting_rules_load_and_their_unit_tests_pass() {
    let dir = repo_root().join("deploy/prometheus");
    let checked = run(&["check", "rules", "strata-rules.yml"], &dir);
    assert!(checked.contains("SUCCESS: 11 rules found"), "{checked}");
    let tested = run(&["test", "rules", "strata-rules.test.yml"], &dir);
    assert!(tested.contains("SUCCESS"), "{tested}");
    // The example configuration loads the rules it ships beside.
    let config = run(&["check", "config", "prometheus.yml"], &dir);
    assert!(config.contains("SUCCESS"), "{config}");
}

#[test]
fn every_dashboard_query_parses() {
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo_root().join("deploy/grafana/strata.json")).unwrap(),
    )
    .unwrap();
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            exprs.push(target["expr"].as_str().unwrap().to_string());
        }
    }
    assert!(exprs.len() >= 12, "{exprs:?}");
    // promtool parses queries as recording rules; the dashboard's variable
    // is a string inside a matcher, valid PromQL as it stands.
    let dir = tempfile::tempdir().unwrap();
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, e) in exprs.iter().enumerate() {
        rules.push_str(&format!(
            "      - record: dashboard:query{i}\n        expr: {}\n",
            serde_json::to_string(e).unwrap()
        ));
    }
    std::fs::write(dir.path().join("dashboard.yml"), rules).unwrap();
    let checked = run(&["check", "rules", "dashboard.yml"], dir.path());
    assert!(
        checked.contains(&format!("SUCCESS: {} rules found", exprs.len())),
        "{checked}"
    );
    // And a broken query is refused, so the check above can fail.
    std::fs::write(
        dir.path().join("broken.yml"),
        "groups:\n  - name: b\n    rules:\n      - record: b:q\n        expr: \"sum(strata_jobs\"\n",
    )
    .unwrap();
    let out = Command::new(promtool())
        .args(["check", "rules", "broken.yml"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
}
