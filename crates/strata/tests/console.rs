//! The web console in a real browser: headless Chromium, driven by the
//! Python tests in `tests/console/` (selenium, pytest), against a real
//! `strata serve` archiving a real PostgreSQL. `scripts/install-test-deps.sh`
//! installs Chromium, its driver and the Python packages.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::agent::AgentProcess;
use common::{wait_for, Server, Strata};
use testkit::{Cluster, FsKind, LoopFs};

const INSTANCE: &str = "pg-main";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repository root")
}

/// The venv's Python, after checking the browser and the packages are there.
fn prerequisites(root: &Path) -> PathBuf {
    let hint = "run scripts/install-test-deps.sh (as root) first";
    let python = root.join(".cache/venv/bin/python");
    assert!(
        python.exists(),
        "the console tests need the Python venv {}: {hint}",
        python.display()
    );
    for bin in ["chromium", "chromedriver"] {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
            .unwrap_or(false);
        assert!(
            found,
            "the console tests need {bin} (Debian packages chromium, chromium-driver): {hint}"
        );
    }
    let out = Command::new(&python)
        .args(["-c", "import selenium, pytest"])
        .output()
        .expect("run the venv's python");
    assert!(
        out.status.success(),
        "the console tests need selenium and pytest in {}: {hint}\n{}",
        python.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    python
}

/// One raw HTTP/1.1 request; returns the status line and the headers.
fn request(port: u16, head: &str) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "{head}\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    resp.split("\r\n\r\n")
        .next()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn console_in_a_headless_browser() {
    let root = repo_root();
    let python = prerequisites(&root);
    let cluster = Cluster::start_default(15);
    // A fixed node id, so a second node can be named that never takes the
    // instance (rendezvous hashing is deterministic).
    let strata = Strata::with_config("console", "", "[node]\nid = \"node-main\"\n");
    // Manual backups are slowed so the browser can watch their progress
    // move; the first, automatic one runs at full speed.
    let mut config = std::fs::OpenOptions::new()
        .append(true)
        .open(&strata.config)
        .unwrap();
    // Drills on (the default), for the Data Backup list's drill column.
    writeln!(
        config,
        "[scheduler]\nmanual_backup_max_rate_kb = 4000\n[drills]\nenabled = true"
    )
    .unwrap();
    drop(config);
    // Data the Restore tab's clone and database restore must bring back:
    // in the first backup, and not changed afterwards.
    cluster.psql(
        "postgres",
        "CREATE TABLE ledger (id int PRIMARY KEY, note text); \
         INSERT INTO ledger SELECT g, md5(g::text) FROM generate_series(1, 300) g;",
    );
    cluster.psql("postgres", "CREATE DATABASE shop");
    cluster.psql(
        "shop",
        "CREATE TABLE orders (id int PRIMARY KEY, item text, qty int); \
         INSERT INTO orders SELECT g, 'item ' || g, g % 7 FROM generate_series(1, 120) g;",
    );
    strata.add_instance(INSTANCE, &cluster);
    let (server, keys) = serve_after_first_backup(&strata);

    // A second node joins the catalog and leaves cleanly, so the Nodes page
    // has a node that left beside the live one.
    let spare_id = (0..100)
        .map(|i| format!("node-spare-{i}"))
        .find(|n| {
            let live = ["node-main".to_string(), n.clone()].into_iter().collect();
            strata_service::fleet::desired_owner(INSTANCE, &live) == Some("node-main")
        })
        .unwrap();
    let spare = Strata::with_config(
        "console-spare",
        &format!(
            "catalog = {:?}\nrepository = {:?}\n",
            strata.dir.join("data/catalog.db").display().to_string(),
            strata.repo_dir().display().to_string()
        ),
        &format!("[node]\nid = {spare_id:?}\n[drills]\nenabled = false\n"),
    );
    let (ok, out, err) = Server::start(&spare, &[]).stop();
    assert!(ok, "the second node exited with an error:\n{out}\n{err}");

    // A browser opening `/` lands in the console; RPC calls to `/` do not.
    let browser = request(
        server.port,
        "GET / HTTP/1.1\r\nAccept: text/html,application/xhtml+xml,*/*;q=0.8",
    );
    assert!(
        browser.starts_with("HTTP/1.1 303") && browser.contains("location: /console/"),
        "{browser}"
    );
    for rpc in [
        "GET / HTTP/1.1\r\nAccept: application/json",
        "GET /?Action=DescribeDBInstances&Version=2014-08-15 HTTP/1.1\r\nAccept: text/html",
        "POST / HTTP/1.1\r\nAccept: text/html",
    ] {
        let answer = request(server.port, rpc);
        assert!(
            answer.starts_with("HTTP/1.1 400") && answer.contains("application/json"),
            "{rpc}: {answer}"
        );
    }

    run_browser_tests(
        &python,
        "tests/console/test_console.py",
        "console-screenshots",
        &browser_env(
            &server,
            &keys,
            &strata,
            &cluster,
            &[("STRATA_LEFT_NODE", spare_id.clone())],
        ),
    );
    let (ok, out, err) = server.stop();
    assert!(ok, "serve exited with an error:\n{out}\n{err}");
}

/// An admin and a read-only key pair.
struct Keys {
    admin: serde_json::Value,
    reader: serde_json::Value,
}

/// Creates the keys the browser signs in with and starts `strata serve`;
/// returns once the instance's first automatic backup succeeded.
fn serve_after_first_backup(strata: &Strata) -> (Server, Keys) {
    let key = |extra: &[&str]| -> serde_json::Value {
        let mut args = vec!["key", "create", "--json"];
        args.extend_from_slice(extra);
        serde_json::from_str(strata.ok(&args).trim()).unwrap()
    };
    let keys = Keys {
        admin: key(&[]),
        reader: key(&["--read-only"]),
    };
    let server = Server::start(strata, &[]);
    wait_for("the first automatic backup", 120, || {
        strata
            .backups(INSTANCE)
            .iter()
            .any(|b| b["status"] == "Success")
    });
    (server, keys)
}

/// What every browser test module reads from its environment, and `extra`.
fn browser_env(
    server: &Server,
    keys: &Keys,
    strata: &Strata,
    cluster: &Cluster,
    extra: &[(&'static str, String)],
) -> Vec<(&'static str, String)> {
    let text = |v: &serde_json::Value, k: &str| v[k].as_str().unwrap().to_string();
    let mut env = vec![
        ("STRATA_URL", format!("http://127.0.0.1:{}", server.port)),
        ("STRATA_INSTANCE", INSTANCE.to_string()),
        ("STRATA_ADMIN_KEY_ID", text(&keys.admin, "AccessKeyId")),
        (
            "STRATA_ADMIN_KEY_SECRET",
            text(&keys.admin, "AccessKeySecret"),
        ),
        ("STRATA_RO_KEY_ID", text(&keys.reader, "AccessKeyId")),
        (
            "STRATA_RO_KEY_SECRET",
            text(&keys.reader, "AccessKeySecret"),
        ),
        ("STRATA_CONFIG", strata.config.display().to_string()),
        ("STRATA_PG_HOST", cluster.host().to_string()),
        ("STRATA_PG_PORT", cluster.port().to_string()),
        ("STRATA_PG_BIN", cluster.bin_dir().display().to_string()),
    ];
    env.extend_from_slice(extra);
    env
}

/// Runs the browser tests of `file` with `env` (and the binary, screenshot and docs
/// directories), failing with their output when any fails.
fn run_browser_tests(python: &Path, file: &str, shots_dir: &str, env: &[(&str, String)]) {
    let root = repo_root();
    let shots = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(shots_dir);
    let _ = std::fs::remove_dir_all(&shots);
    std::fs::create_dir_all(&shots).unwrap();
    let out = Command::new(python)
        .args(["-m", "pytest", file, "-v", "-p", "no:cacheprovider"])
        .current_dir(&root)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("STRATA_BIN", env!("CARGO_BIN_EXE_strata"))
        .env("STRATA_SCREENSHOTS", &shots)
        .env("STRATA_DOCS_DIR", root.join("docs"))
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .expect("run pytest");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}\n{stderr}\nscreenshots: {}", shots.display());
    assert!(
        out.status.success() && stdout.contains(" passed"),
        "the browser tests failed or ran nothing (screenshots in {}):\n{stdout}\n{stderr}",
        shots.display()
    );
}

/// A snapshot backup set in the console: PostgreSQL on a loop-mounted XFS with `strata agent`
/// beside it, the instance registered with the agent; the browser takes a snapshot backup,
/// finds it listed with its method, and clones it from the list, the clone made by the agent.
#[test]
fn console_clones_a_snapshot_set_through_the_agent() {
    let root = repo_root();
    let python = prerequisites(&root);
    let Some(fs) = LoopFs::or_skip(FsKind::Xfs, 600, true) else {
        return;
    };
    let cluster = Cluster::builder(15)
        .in_dir(fs.path())
        .conf("max_wal_size = 128MB")
        .conf("min_wal_size = 32MB")
        .start();
    cluster.psql(
        "postgres",
        "CREATE TABLE ledger (id int PRIMARY KEY, note text); \
         INSERT INTO ledger SELECT g, md5(g::text) FROM generate_series(1, 300) g;",
    );
    let agent = AgentProcess::start(cluster.data_dir(), testkit::free_port());
    let strata = Strata::with_config("console-snapshot", "", "[drills]\nenabled = false\n");
    let port = cluster.port().to_string();
    let key_file = agent.key_file().display().to_string();
    let agent_url = agent.url();
    let mut add = common::add_args(INSTANCE, &port, "postgres");
    add.extend_from_slice(&["--agent", &agent_url, "--agent-key-file", &key_file]);
    strata.ok(&add);
    let (server, keys) = serve_after_first_backup(&strata);

    run_browser_tests(
        &python,
        "tests/console/test_console_snapshot.py",
        "console-snapshot-screenshots",
        &browser_env(
            &server,
            &keys,
            &strata,
            &cluster,
            &[(
                "STRATA_AGENT_CLONE_DIR",
                agent.clone_dir().display().to_string(),
            )],
        ),
    );
    let (ok, out, err) = server.stop();
    assert!(ok, "serve exited with an error:\n{out}\n{err}");
}

/// The Restore tab's recovery events: a large DELETE found on the timeline
/// and in the list, undone with "Restore table as it was just before", and
/// cloned to just before (`tests/console/test_recovery_events.py`).
#[test]
fn console_recovery_events_in_a_headless_browser() {
    let root = repo_root();
    let python = prerequisites(&root);
    let cluster = Cluster::start_default(15);
    let strata = Strata::new("console-events");
    strata.add_instance(INSTANCE, &cluster);
    let (server, keys) = serve_after_first_backup(&strata);

    run_browser_tests(
        &python,
        "tests/console/test_recovery_events.py",
        "console-events-screenshots",
        &browser_env(&server, &keys, &strata, &cluster, &[]),
    );
    let (ok, out, err) = server.stop();
    assert!(ok, "serve exited with an error:\n{out}\n{err}");
}

/// What the console offers beside the API's newer actions
/// (`tests/console/test_console_parity.py`): download links of backup sets
/// and WAL, the cross-region backup policy and its copies (to a directory
/// repository as region `eu-copy`), single-table restores and a clone to a
/// point in time.
#[test]
fn console_parity_in_a_headless_browser() {
    let root = repo_root();
    let python = prerequisites(&root);
    let cluster = Cluster::start_default(15);
    let strata = Strata::new("console-parity");
    let mut config = std::fs::OpenOptions::new()
        .append(true)
        .open(&strata.config)
        .unwrap();
    writeln!(
        config,
        "[drills]\nenabled = false\n[regions.eu-copy]\nrepository = {:?}",
        strata.dir.join("eu-copy").display().to_string()
    )
    .unwrap();
    drop(config);
    cluster.psql(
        "postgres",
        "CREATE TABLE ledger (id int PRIMARY KEY, note text); \
         INSERT INTO ledger SELECT g, md5(g::text) FROM generate_series(1, 300) g;",
    );
    strata.add_instance(INSTANCE, &cluster);
    let (server, keys) = serve_after_first_backup(&strata);

    run_browser_tests(
        &python,
        "tests/console/test_console_parity.py",
        "console-parity-screenshots",
        &browser_env(&server, &keys, &strata, &cluster, &[]),
    );
    let (ok, out, err) = server.stop();
    assert!(ok, "serve exited with an error:\n{out}\n{err}");
}

/// A port nothing listens on once this returns (the browser test's
/// receiver binds it, or nobody does).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The Notifications page (`tests/console/test_notifications.py`): a webhook
/// routed to the instance whose receiver the browser test runs, a webhook
/// nobody answers and an SMTP sink with a password; the page lists them
/// without their secrets, and "Send test" reaches the receiver or shows the
/// failure.
#[test]
fn console_notifications_in_a_headless_browser() {
    let root = repo_root();
    let python = prerequisites(&root);
    let cluster = Cluster::start_default(15);
    let strata = Strata::with_config("console-notify", "", "[drills]\nenabled = false\n");
    let (hook_port, dead_port) = (free_port(), free_port());
    let hook_secret = "hook-secret-7f3a9c";
    let dead_secret = "dead-secret-41be02";
    let smtp_password = "smtp-password-c0ffee";
    let path_token = "path-token-9d1e";
    let file = |name: &str, text: &str| {
        let path = strata.dir.join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    let mut config = std::fs::OpenOptions::new()
        .append(true)
        .open(&strata.config)
        .unwrap();
    writeln!(
        config,
        "[[notify.webhook]]\nname = \"ops\"\nurl = \"http://127.0.0.1:{hook_port}/hook/{path_token}\"\n\
         secret_file = {:?}\ninstances = [\"{INSTANCE}\"]\nevents = [\"backup-failed\", \"drill-failed\"]\nretries = 0\n\
         [[notify.webhook]]\nname = \"dead\"\nurl = \"http://127.0.0.1:{dead_port}/hook\"\n\
         secret_file = {:?}\nretries = 0\ntimeout_secs = 2\n\
         [[notify.email]]\nname = \"dba\"\nhost = \"127.0.0.1\"\nport = {dead_port}\nsecurity = \"none\"\n\
         user = \"strata\"\npassword_file = {:?}\nfrom = \"strata@example.com\"\nto = [\"dba@example.com\"]\ntimeout_secs = 2",
        file("hook.secret", hook_secret),
        file("dead.secret", dead_secret),
        file("smtp.password", smtp_password),
    )
    .unwrap();
    drop(config);
    strata.add_instance(INSTANCE, &cluster);
    let (server, keys) = serve_after_first_backup(&strata);

    run_browser_tests(
        &python,
        "tests/console/test_notifications.py",
        "console-notify-screenshots",
        &browser_env(
            &server,
            &keys,
            &strata,
            &cluster,
            &[
                ("STRATA_HOOK_PORT", hook_port.to_string()),
                ("STRATA_DEAD_PORT", dead_port.to_string()),
                ("STRATA_HOOK_SECRET", hook_secret.to_string()),
                (
                    "STRATA_HIDDEN",
                    [hook_secret, dead_secret, smtp_password, path_token].join(","),
                ),
            ],
        ),
    );
    let (ok, out, err) = server.stop();
    assert!(ok, "serve exited with an error:\n{out}\n{err}");
}
