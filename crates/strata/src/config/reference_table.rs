//! Holds the README's configuration reference (the `| key | env | default |
//! meaning |` table under "## Configuration") to the code: every key it names
//! is one [`Config`] accepts, every key [`Config`] accepts is in it, and every
//! default it states as a plain value (a number, `true`/`false`, a simple
//! string or list) is the one the configuration resolves to.
//!
//! The keys [`Config`] accepts are found by asking serde: a table with an
//! unknown key is refused with the list of the keys it expects.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use super::*;

/// A key the probes below never meet in a real configuration.
const PROBE: &str = "zz_probe_key";
/// Stands for the user's name of a map entry (`regions.<id>`).
const ID: &str = "<id>";

/// The README's table rows: (keys of the row, default cell).
fn readme_rows() -> Vec<(Vec<String>, String)> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md");
    let text = std::fs::read_to_string(&path).expect("README.md");
    let section = text
        .split("\n## ")
        .find(|s| s.starts_with("Configuration\n"))
        .expect("a \"## Configuration\" section");
    let mut rows = Vec::new();
    let mut in_table = false;
    for line in section.lines() {
        if line.starts_with("| key | env | default | meaning |") {
            in_table = true;
            continue;
        }
        if !in_table || line.starts_with("|---") {
            continue;
        }
        if !line.starts_with('|') {
            break;
        }
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        assert_eq!(cells.len(), 4, "a row of four cells: {line}");
        let keys = cells[0]
            .split(", ")
            .map(|k| {
                k.strip_prefix('`')
                    .and_then(|k| k.strip_suffix('`'))
                    .unwrap_or_else(|| panic!("a key in backticks: {line}"))
                    .to_string()
            })
            .collect();
        rows.push((keys, cells[2].to_string()));
    }
    assert!(rows.len() > 40, "the table was not found whole");
    rows
}

/// Stands for the elements of an array of tables (`[[notify.webhook]]`).
const ELEMENT: &str = "[]";

/// TOML that sets `PROBE` in the table at `path` (`<id>` written as a name,
/// an array's element as its one element).
fn probe_toml(path: &[String]) -> String {
    let table: Vec<&str> = path
        .iter()
        .map(|p| if p == ID { "x" } else { p.as_str() })
        .collect();
    if let Some(at) = table.iter().position(|p| *p == ELEMENT) {
        let array = table[..at].join(".");
        let rest = &table[at + 1..];
        return if rest.is_empty() {
            format!("[[{array}]]\n{PROBE} = 1")
        } else {
            format!("[[{array}]]\n[{array}.{}]\n{PROBE} = 1", rest.join("."))
        };
    }
    if table.is_empty() {
        format!("{PROBE} = 1")
    } else {
        format!("[{}]\n{PROBE} = 1", table.join("."))
    }
}

/// `a.b.[].c` as the README writes it: `a.b[].c`.
fn dotted(path: &[String]) -> String {
    path.join(".").replace(".[]", "[]")
}

/// Every key [`Config`] accepts, dotted, maps' entries as `<id>`.
fn config_keys(path: Vec<String>, keys: &mut BTreeSet<String>) {
    let err = toml::from_str::<Config>(&probe_toml(&path))
        .err()
        .map(|e| e.message().to_string());
    let dotted = dotted(&path);
    match err {
        // A table with the shared tuning keys flattened into it (`[s3]`):
        // serde names no fields, so the README's keys of the table of that
        // name are tried one by one, and the shared keys added.
        Some(msg) if msg == format!("unknown field `{PROBE}`") => {
            let table = path.last().expect("a table").clone();
            for (row, _) in readme_rows() {
                for key in row {
                    let Some(name) = key.strip_prefix(&format!("{table}.")) else {
                        continue;
                    };
                    let toml = probe_toml(&path)
                        .replace(&format!("{PROBE} = 1"), &format!("{name} = \"probe\""));
                    let refused = toml::from_str::<Config>(&toml)
                        .err()
                        .is_some_and(|e| e.message().starts_with("unknown field"));
                    if !name.contains('.') && !refused {
                        keys.insert(format!("{dotted}.{name}"));
                    }
                }
            }
            for name in tuning_keys() {
                keys.insert(format!("{dotted}.{name}"));
            }
        }
        // A struct: serde lists the fields it expects.
        Some(msg) if msg.starts_with(&format!("unknown field `{PROBE}`")) => {
            let expected = msg.split_once("expected").expect("expected fields").1;
            let fields: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
            assert!(!fields.is_empty(), "{dotted}: {msg}");
            for f in fields {
                let mut p = path.clone();
                p.push(f.to_string());
                config_keys(p, keys);
            }
        }
        // A map of tables: its entries' keys.
        Some(msg) if msg.contains("expected struct") && !path.is_empty() => {
            let mut p = path;
            p.push(ID.to_string());
            config_keys(p, keys);
        }
        // A map of values (`usage.instance_free_quota`).
        Some(msg) if msg.starts_with("invalid type: integer") && !path.is_empty() => {
            keys.insert(format!("{dotted}.{ID}"));
        }
        // An array of tables: its elements' keys.
        Some(msg)
            if msg.starts_with("invalid type: map, expected a sequence")
                && is_array_of_tables(&path) =>
        {
            let mut p = path;
            p.push(ELEMENT.to_string());
            config_keys(p, keys);
        }
        // A value: a table is not one.
        Some(msg) if msg.starts_with("invalid type: map") => {
            keys.insert(dotted);
        }
        other => panic!("{dotted}: cannot tell what this key is: {other:?}"),
    }
}

/// Whether the sequence at `path` holds tables (its element takes fields).
fn is_array_of_tables(path: &[String]) -> bool {
    let mut p = path.to_vec();
    p.push(ELEMENT.to_string());
    toml::from_str::<Config>(&probe_toml(&p))
        .err()
        .is_some_and(|e| e.message().starts_with(&format!("unknown field `{PROBE}`")))
}

/// The keys of [`TuningSettings`], which every object-store table has.
fn tuning_keys() -> Vec<String> {
    let err = toml::from_str::<TuningSettings>(&format!("{PROBE} = 1"))
        .expect_err("the probe is refused");
    let msg = err.message().to_string();
    let expected = msg.split_once("expected").expect("expected fields").1;
    let keys: Vec<String> = expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect();
    assert!(keys.len() >= 6, "{msg}");
    keys
}

/// `azure.max_attempts` → `max_attempts`: a shared tuning key of `[azure]` or `[gcs]`.
fn shared_tuning_key(key: &str) -> Option<&'static str> {
    let (table, name) = key.split_once('.')?;
    if table != "azure" && table != "gcs" {
        return None;
    }
    [
        "multipart_threshold_mb",
        "part_size_mb",
        "max_concurrency",
        "upload_concurrency",
        "request_timeout_secs",
        "max_attempts",
    ]
    .into_iter()
    .find(|k| *k == name)
}

/// The resolved default of `key` as the README writes it, for the keys
/// whose default is a plain value.
fn resolved_default(key: &str) -> Option<String> {
    let config = Config::default();
    let engine = config.engine_settings();
    let service = config.service_settings().expect("default service settings");
    let min_free = config
        .local_repository
        .min_free()
        .expect("default min_free");
    let s3_default = S3Settings::default();
    let s3 = s3_config("s3://strata-defaults", &s3_default).expect("default S3 config");
    let azure_default = AzureSettings::default();
    let azure =
        azure_config("azure://strata-defaults", &azure_default).expect("default Azure config");
    let gcs_default = GcsSettings::default();
    let gcs = gcs_config("gs://strata-defaults", &gcs_default).expect("default GCS config");
    const MIB: usize = 1024 * 1024;
    Some(match key {
        "data_dir" => config.data_dir().display().to_string(),
        "repository" => config.repository(),
        "catalog" => config.catalog_path().display().to_string(),
        // Made absolute for the servers Strata starts; the table gives it relative.
        "instances.dir" => {
            let cwd = std::env::current_dir().expect("working directory");
            let dir = service.instances_dir.clone();
            dir.strip_prefix(&cwd).unwrap_or(&dir).display().to_string()
        }
        "compress_level" => config.compress_level().to_string(),
        "region_id" => config.region_id(),
        "local_repository.min_free_bytes" => min_free.bytes.to_string(),
        "local_repository.min_free_percent" => min_free.percent.to_string(),
        "wal.flush_interval_ms" => engine.wal_flush_interval.as_millis().to_string(),
        "snapshot.upload_parallel" => engine.snapshot_upload_parallel.to_string(),
        "snapshot.keep_local" => service.snapshot_keep_local.to_string(),
        "snapshot.local_max_bytes" => service.snapshot_local_max_bytes.unwrap_or(0).to_string(),
        "wal.status_interval_secs" => engine.wal_status_interval.as_secs().to_string(),
        "wal.receiver_timeout_secs" => engine.wal_receiver_timeout.as_secs().to_string(),
        "wal.recovery_events" => engine.recovery_events.to_string(),
        "wal.event_min_rows" => engine.event_min_rows.to_string(),
        "wal.retry_max_secs" => {
            // Two parts obey this key; they must start from the same value.
            let (e, s) = (engine.wal_retry_max, service.receiver_backoff_max);
            assert_eq!(e, s, "engine and service WAL retry defaults differ");
            e.as_secs().to_string()
        }
        "restore.start_timeout_secs" => engine.start_timeout.as_secs().to_string(),
        "server.listen" => config.listen(),
        "scheduler.tick_secs" => service.tick.as_secs().to_string(),
        "scheduler.retention_interval_secs" => service.retention_interval.num_seconds().to_string(),
        "jobs.lease_secs" => engine.job_lease.as_secs().to_string(),
        "jobs.keep_days" => service.job_keep.map_or(0, |k| k.num_days()).to_string(),
        "gc.grace_secs" => engine.gc_grace.as_secs().to_string(),
        "node.lease_secs" => service.node.lease.as_secs().to_string(),
        "instances.port_range" => format!("{}-{}", service.local_ports.0, service.local_ports.1),
        "instances.listen" => service.local_listen,
        "drills.enabled" => service.drills.to_string(),
        "downloads.link_lifetime_secs" => config.link_lifetime().num_seconds().to_string(),
        "usage.sample_interval_secs" => service.usage.sample_interval.num_seconds().to_string(),
        "usage.free_quota" => service.usage.default_quota.to_string(),
        "postgres.bin_dirs" => format!("{:?}", engine.pg_bin_dirs),
        "s3.region" => s3.region,
        "kms.region" => KMS_DEFAULT_REGION.to_string(),
        "s3.path_style" => s3.path_style.to_string(),
        "s3.allow_http" => s3.allow_http.to_string(),
        "s3.multipart_threshold_mb" => (s3.tuning.multipart_threshold / MIB).to_string(),
        "s3.part_size_mb" => (s3.tuning.part_size / MIB).to_string(),
        "s3.max_concurrency" => s3.tuning.max_concurrency.to_string(),
        "s3.upload_concurrency" => s3.tuning.upload_concurrency.to_string(),
        "s3.request_timeout_secs" => s3.tuning.request_timeout.as_secs().to_string(),
        "s3.max_attempts" => s3_default.tuning.retry_policy().max_attempts.to_string(),
        "notify.wal_failing_minutes" => {
            (service.notify.wal_failing_after.as_secs() / 60).to_string()
        }
        "notify.wal_lag_mb" => match service.notify.wal_lag_bytes {
            Some(b) => (b >> 20).to_string(),
            None => "0".to_string(),
        },
        "notify.webhook[].retries" => notify::WEBHOOK_RETRIES.to_string(),
        "notify.webhook[].timeout_secs" | "notify.email[].timeout_secs" => {
            notify::SINK_TIMEOUT_SECS.to_string()
        }
        "notify.email[].security" => notify::SMTP_SECURITY.to_string(),
        "azure.use_emulator" => azure.use_emulator.to_string(),
        "gcs.use_emulator" => gcs.use_emulator.to_string(),
        // The shared tuning keys of `[azure]` and `[gcs]` resolve as `[s3]`'s do.
        _ if shared_tuning_key(key).is_some() => {
            let shared = shared_tuning_key(key).expect("checked");
            let (tuning, retries) = match key.split('.').next() {
                Some("azure") => (azure.tuning, azure_default.tuning.retry_policy()),
                _ => (gcs.tuning, gcs_default.tuning.retry_policy()),
            };
            match shared {
                "multipart_threshold_mb" => (tuning.multipart_threshold / MIB).to_string(),
                "part_size_mb" => (tuning.part_size / MIB).to_string(),
                "max_concurrency" => tuning.max_concurrency.to_string(),
                "upload_concurrency" => tuning.upload_concurrency.to_string(),
                "request_timeout_secs" => tuning.request_timeout.as_secs().to_string(),
                _ => retries.max_attempts.to_string(),
            }
        }
        _ => return None,
    })
}

/// The value a default cell states, when it states one plainly: one
/// backticked value, optionally followed by a parenthesized gloss
/// (`` `1073741824` (1 GiB) ``); `<data_dir>` stands for the default data
/// directory, no other placeholder is plain.
fn plain_default(cell: &str) -> Option<String> {
    let rest = cell.strip_prefix('`')?;
    let (value, after) = rest.split_once('`')?;
    let after = after.trim();
    let value = value.replace(
        "<data_dir>",
        &Config::default().data_dir().display().to_string(),
    );
    let plain = !value.contains('<')
        && (after.is_empty() || (after.starts_with('(') && after.ends_with(')')));
    plain.then(|| value.strip_prefix("./").unwrap_or(&value).to_string())
}

#[test]
fn readme_table_lists_every_key() {
    let mut accepted = BTreeSet::new();
    config_keys(Vec::new(), &mut accepted);
    let mut documented = BTreeSet::new();
    for (keys, _) in readme_rows() {
        for key in keys {
            match key.strip_suffix(".*") {
                // `regions.<id>.s3.*`: every key under that table.
                Some(table) => {
                    let under: Vec<_> = accepted
                        .iter()
                        .filter(|k| k.starts_with(&format!("{table}.")))
                        .cloned()
                        .collect();
                    assert!(!under.is_empty(), "README names {key}, which has no keys");
                    documented.extend(under);
                }
                None => {
                    documented.insert(key);
                }
            }
        }
    }
    let unknown: Vec<_> = documented.difference(&accepted).collect();
    let missing: Vec<_> = accepted.difference(&documented).collect();
    assert!(
        unknown.is_empty(),
        "README lists keys Config does not accept: {unknown:?}"
    );
    assert!(
        missing.is_empty(),
        "Config accepts keys README does not list: {missing:?}"
    );
}

#[test]
fn readme_defaults_are_the_resolved_ones() {
    let mut compared = BTreeMap::new();
    for (keys, cell) in readme_rows() {
        let Some(stated) = plain_default(&cell) else {
            continue;
        };
        for key in keys {
            let resolved = resolved_default(&key).unwrap_or_else(|| {
                panic!("README states {key} = {stated:?}: teach resolved_default that key")
            });
            assert_eq!(resolved, stated, "default of {key}: code vs README");
            compared.insert(key, stated.clone());
        }
    }
    // Every key with a plain resolved default states it in the table.
    let mut accepted = BTreeSet::new();
    config_keys(Vec::new(), &mut accepted);
    let unstated: Vec<_> = accepted
        .iter()
        .filter(|k| resolved_default(k).is_some() && !compared.contains_key(*k))
        .collect();
    assert!(
        unstated.is_empty(),
        "README states no plain default for {unstated:?}"
    );
    assert!(compared.len() > 25, "only {compared:?} compared");
}

#[test]
fn plain_defaults_are_recognized() {
    let cases = [
        ("`200`", Some("200")),
        ("`1073741824` (1 GiB)", Some("1073741824")),
        ("`./strata-data`", Some("strata-data")),
        ("`[\"/a/{major}/bin\"]`", Some("[\"/a/{major}/bin\"]")),
        ("`<data_dir>/repo`", Some("strata-data/repo")),
        ("`<id>`", None),
        ("2 × CPUs", None),
        ("`postgres` when root", None),
        ("none", None),
        ("as `s3.*`", None),
    ];
    for (cell, want) in cases {
        assert_eq!(plain_default(cell).as_deref(), want, "{cell}");
    }
}
