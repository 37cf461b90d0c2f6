//! The Debian package (packaging/deb) on this machine: built, inspected,
//! installed with dpkg, its service run as its unit says, a backup taken and
//! restored through it, then removed and purged.
//!
//! The package holds the debug binary this suite already built
//! (`CARGO_BIN_EXE_strata`), not a release build: the packaging is what is
//! under test, and a release build would cost CI minutes. The package is
//! installed system-wide (/usr/bin/strata, /etc/strata, /var/lib/strata, the
//! `strata` user): this file holds the only test touching those, and it
//! refuses to start when any of them already exists. systemd is usually not
//! PID 1 here (where it is, the service postinst started is stopped first), so
//! the service is run the way its unit would run it: ExecStart under
//! User=/Group= with its Environment=, WorkingDirectory= and UMask=, all read
//! from the installed unit file; the unit's sandboxing is checked by
//! `systemd-analyze verify` only.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{http_get, signed_call_with_key, wait_for};
use testkit::Cluster;

const UNIT: &str = "/lib/systemd/system/strata.service";
const AGENT_UNIT: &str = "/lib/systemd/system/strata-agent.service";
const CONFIG: &str = "/etc/strata/strata.toml";
const DATA: &str = "/var/lib/strata";
const WANTS: &str = "/etc/systemd/system/multi-user.target.wants/strata.service";

fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Runs and expects success; returns stdout and stderr together.
fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

fn installed_status() -> String {
    let out = run(Command::new("dpkg-query").args(["-W", "-f=${Status}", "strata"]));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `getent passwd strata` split into its fields, if the user exists.
fn strata_user() -> Option<Vec<String>> {
    let out = run(Command::new("getent").args(["passwd", "strata"]));
    out.status.success().then(|| {
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .split(':')
            .map(str::to_string)
            .collect()
    })
}

fn group_exists() -> bool {
    run(Command::new("getent").args(["group", "strata"]))
        .status
        .success()
}

/// Mode, owner name and group name of `path`.
fn stat(path: &str) -> (u32, String, String) {
    let out = ok(Command::new("stat").args(["-c", "%a %U %G", path]));
    let f: Vec<&str> = out.split_whitespace().collect();
    (
        u32::from_str_radix(f[0], 8).unwrap(),
        f[1].to_string(),
        f[2].to_string(),
    )
}

/// The `[Service]` settings of a unit file: every value of each key, in order.
fn service_section(path: &str) -> BTreeMap<String, Vec<String>> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut section = String::new();
    let mut settings: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if line.starts_with('[') {
            section = line.to_string();
            continue;
        }
        if section == "[Service]" {
            let (k, v) = line.split_once('=').unwrap();
            settings
                .entry(k.trim().to_string())
                .or_default()
                .push(v.trim().to_string());
        }
    }
    settings
}

/// The words of a unit setting, double quotes grouping as systemd does.
fn unit_words(value: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut quoted = false;
    for c in value.chars() {
        match c {
            '"' => quoted = !quoted,
            c if c.is_whitespace() && !quoted => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            c => word.push(c),
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    words
}

fn one<'a>(unit: &'a BTreeMap<String, Vec<String>>, key: &str) -> &'a str {
    match unit.get(key).map(Vec::as_slice) {
        Some([v]) => v,
        other => panic!("{key}= of the unit: {other:?}"),
    }
}

/// Everything the test put on this machine, taken away again however the
/// test ends: the service and the servers it started, the package with its
/// data, the user.
struct Machine {
    scratch: PathBuf,
    serve: Option<Child>,
}

impl Machine {
    /// Stops the service as systemd would (SIGTERM) and returns its exit
    /// status, stdout and stderr.
    fn stop_serve(&mut self) -> (bool, String, String) {
        let mut child = self.serve.take().expect("the service runs");
        // SAFETY: kill with the pid of a child we own.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(60);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let status = child.wait().unwrap();
        let read = |name: &str| std::fs::read_to_string(self.scratch.join(name)).unwrap();
        (status.success(), read("serve.out"), read("serve.err"))
    }
}

/// Sends SIGQUIT (immediate shutdown) to every PostgreSQL server whose data
/// directory lies under `dir`, by the pid in its `postmaster.pid`.
fn stop_servers_under(dir: &Path, depth: u32) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        if e.file_name() == "postmaster.pid" {
            let pid = std::fs::read_to_string(&path)
                .ok()
                .and_then(|t| t.lines().next()?.trim().parse::<i32>().ok());
            if let Some(pid) = pid {
                // SAFETY: kill with a pid read from the server's own pid file.
                unsafe { libc::kill(pid, libc::SIGQUIT) };
            }
        } else if depth > 0 && e.file_type().is_ok_and(|t| t.is_dir()) {
            stop_servers_under(&path, depth - 1);
        }
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        if let Some(mut child) = self.serve.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        stop_servers_under(Path::new(DATA), 4);
        std::thread::sleep(Duration::from_secs(1));
        if !installed_status().is_empty() {
            let _ = Command::new("dpkg")
                .args(["--purge", "strata"])
                .env("STRATA_PURGE_DATA", "yes")
                .output();
        }
        let _ = std::fs::remove_dir_all(DATA);
        let _ = std::fs::remove_dir_all("/etc/strata");
        if strata_user().is_some() {
            let _ = Command::new("userdel").arg("strata").output();
        }
        if group_exists() {
            let _ = Command::new("groupdel").arg("strata").output();
        }
        let _ = std::fs::remove_dir_all(&self.scratch);
    }
}

/// Runs the installed unit's ExecStart as its User=/Group=, in its
/// WorkingDirectory= with its UMask= and Environment= (plus the login
/// variables systemd sets and `overrides`, as a drop-in would add them).
/// Its stdout and stderr (the journal's part) go to `out` and `err`.
fn start_as_unit(
    unit: &BTreeMap<String, Vec<String>>,
    overrides: &[(&str, String)],
    out: &Path,
    err: &Path,
) -> Child {
    let exec = unit_words(one(unit, "ExecStart"));
    assert!(
        exec.iter().all(|w| !w.contains('$')),
        "ExecStart expands variables the test does not: {exec:?}"
    );
    let user = one(unit, "User");
    let group = one(unit, "Group");
    let home = strata_user().expect("the strata user")[5].clone();
    let umask = u32::from_str_radix(one(unit, "UMask"), 8).unwrap();
    let mut cmd = Command::new("setpriv");
    cmd.arg(format!("--reuid={user}"))
        .arg(format!("--regid={group}"))
        .arg("--init-groups")
        .arg("--")
        .args(&exec)
        .current_dir(one(unit, "WorkingDirectory"))
        .env_clear()
        .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin")
        .env("HOME", home)
        .env("USER", user)
        .env("LOGNAME", user);
    for assignments in unit.get("Environment").into_iter().flatten() {
        for word in unit_words(assignments) {
            let (k, v) = word.split_once('=').unwrap();
            cmd.env(k, v);
        }
    }
    for (k, v) in overrides {
        cmd.env(k, v);
    }
    // SAFETY: umask is async-signal-safe and touches no memory.
    unsafe {
        cmd.pre_exec(move || {
            libc::umask(umask as libc::mode_t);
            Ok(())
        });
    }
    cmd.stdin(Stdio::null())
        .stdout(std::fs::File::create(out).unwrap())
        .stderr(std::fs::File::create(err).unwrap())
        .spawn()
        .unwrap()
}

/// A process killed (and reaped) when dropped.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The agent unit's ExecStart with its EnvironmentFile= read as systemd
/// reads it: `${VAR}` is one word (empty or not), `$VAR` splits on spaces.
fn agent_command(unit: &BTreeMap<String, Vec<String>>) -> Command {
    let env_file = one(unit, "EnvironmentFile").trim_start_matches('-');
    let vars: BTreeMap<String, String> = std::fs::read_to_string(env_file)
        .unwrap()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l.split_once('=').unwrap();
            (k.to_string(), v.trim_matches('"').to_string())
        })
        .collect();
    let var = |name: &str| vars.get(name).cloned().unwrap_or_default();
    let mut words = Vec::new();
    for word in unit_words(one(unit, "ExecStart")) {
        if let Some(name) = word.strip_prefix("${").and_then(|w| w.strip_suffix('}')) {
            words.push(var(name));
        } else if let Some(name) = word.strip_prefix('$') {
            words.extend(var(name).split_whitespace().map(str::to_string));
        } else {
            assert!(!word.contains('$'), "{word}");
            words.push(word);
        }
    }
    let mut cmd = Command::new(&words[0]);
    cmd.args(&words[1..])
        .env_clear()
        .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin");
    cmd
}

/// Runs the installed `strata` CLI as the service's user on the packaged
/// configuration, as an operator would (`sudo -u strata strata --config …`).
fn cli(args: &[&str]) -> String {
    let mut cmd = Command::new("runuser");
    cmd.args(["-u", "strata", "--", "/usr/bin/strata", "--config", CONFIG])
        .args(args)
        .current_dir(DATA);
    ok(&mut cmd)
}

#[test]
fn the_debian_package_installs_serves_backs_up_and_purges() {
    assert_eq!(
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() },
        0,
        "installing a package needs root"
    );
    assert!(
        installed_status().is_empty(),
        "package strata is already on this machine ({}); purge it first: dpkg --purge strata",
        installed_status()
    );
    assert!(
        strata_user().is_none() && !group_exists(),
        "a strata user or group already exists"
    );
    for path in ["/usr/bin/strata", "/etc/strata", DATA] {
        assert!(!Path::new(path).exists(), "{path} already exists");
    }
    let scratch = testkit::temp_dir("strata-deb-");
    let mut machine = Machine {
        scratch: scratch.clone(),
        serve: None,
    };

    // Built from the debug binary the suite already has.
    let root = testkit::workspace_root();
    let deb = ok(Command::new(root.join("packaging/deb/build.sh"))
        .arg("--binary")
        .arg(env!("CARGO_BIN_EXE_strata"))
        .arg("--out")
        .arg(&scratch)
        .arg("--fast"));
    let deb = deb.lines().last().unwrap().trim().to_string();
    let version = env!("CARGO_PKG_VERSION");
    assert!(deb.contains(&format!("/strata_{version}_")), "{deb}");

    let info = ok(Command::new("dpkg-deb").args(["--info", &deb]));
    assert!(info.contains("Package: strata\n"), "{info}");
    assert!(info.contains(&format!("Version: {version}\n")), "{info}");
    assert!(info.contains("Depends: libc6 (>= 2."), "{info}");
    assert!(info.contains("Recommends: postgresql-client"), "{info}");
    for script in ["postinst", "prerm", "postrm", "conffiles"] {
        assert!(info.contains(script), "no {script}: {info}");
    }
    let contents = ok(Command::new("dpkg-deb").args(["--contents", &deb]));
    let entry = |path: &str| {
        contents
            .lines()
            .find(|l| l.ends_with(&format!(" .{path}")))
            .unwrap_or_else(|| panic!("no {path} in:\n{contents}"))
            .to_string()
    };
    assert!(entry("/usr/bin/strata").starts_with("-rwxr-xr-x root/root"));
    assert!(entry(CONFIG).starts_with("-rw-r----- root/root"));
    assert!(entry("/etc/strata/").starts_with("drwxr-x--- root/root"));
    assert!(entry(UNIT).starts_with("-rw-r--r-- root/root"));
    assert!(entry(AGENT_UNIT).starts_with("-rw-r--r-- root/root"));
    assert!(entry("/etc/default/strata-agent").starts_with("-rw-r--r-- root/root"));
    assert!(entry("/usr/share/doc/strata/copyright").starts_with("-rw-r--r--"));
    assert!(entry("/").starts_with("drwxr-xr-x root/root"));
    if Path::new("/usr/bin/lintian").exists() {
        let out = run(Command::new("lintian").arg(&deb));
        let text = String::from_utf8_lossy(&out.stdout);
        // Chosen, not overlooked: the symbols stay for backtraces; the
        // placeholder maintainer is replaced with DEBFULLNAME/DEBEMAIL.
        let chosen = [
            "unstripped-binary-or-object",
            "maintainer-address-is-on-localhost",
        ];
        let errors: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("E:") && !chosen.iter().any(|t| l.contains(t)))
            .collect();
        assert!(errors.is_empty(), "lintian:\n{text}");
    }

    // Installed: the user, the files, their modes and owners.
    let installed = ok(Command::new("dpkg").args(["--install", &deb]));
    assert_eq!(installed_status(), "install ok installed", "{installed}");
    let user = strata_user().expect("postinst created the strata user");
    assert_eq!(user[5], DATA);
    assert_eq!(user[6], "/usr/sbin/nologin");
    let uid: u32 = user[2].parse().unwrap();
    assert!(uid < 1000, "not a system user: {user:?}");
    assert_eq!(
        stat("/usr/bin/strata"),
        (0o755, "root".into(), "root".into())
    );
    assert_eq!(stat("/etc/strata"), (0o750, "root".into(), "strata".into()));
    assert_eq!(stat(CONFIG), (0o640, "root".into(), "strata".into()));
    assert_eq!(stat(DATA), (0o750, "strata".into(), "strata".into()));
    let conffiles = ok(Command::new("dpkg-query").args(["-W", "-f=${Conffiles}", "strata"]));
    assert!(conffiles.contains(CONFIG), "{conffiles}");
    assert!(
        conffiles.contains("/etc/default/strata-agent"),
        "{conffiles}"
    );
    // strata.service is enabled; the agent, which needs a data directory, is not.
    assert_eq!(std::fs::read_link(WANTS).unwrap(), Path::new(UNIT));
    assert!(
        !Path::new("/etc/systemd/system/multi-user.target.wants/strata-agent.service").exists()
    );
    let version_out = ok(Command::new("/usr/bin/strata").arg("--version"));
    assert!(version_out.contains(version), "{version_out}");
    if Path::new("/usr/bin/systemd-analyze").exists() {
        ok(Command::new("systemd-analyze").args(["verify", UNIT, AGENT_UNIT]));
    }

    // Where systemd runs, postinst started the service: it is stopped, so
    // the one below is the only process on /var/lib/strata.
    if Path::new("/run/systemd/system").exists() {
        ok(Command::new("systemctl").args(["stop", "strata.service"]));
    }

    // The service, run as its unit runs it, answers.
    let unit = service_section(UNIT);
    assert_eq!(one(&unit, "User"), "strata");
    assert_eq!(one(&unit, "ReadWritePaths"), DATA);
    assert_eq!(one(&unit, "ProtectSystem"), "strict");
    let port = testkit::free_port();
    let mut overrides = vec![("STRATA_LISTEN", format!("127.0.0.1:{port}"))];
    let packaged_default = Path::new("/usr/lib/postgresql/15/bin/postgres");
    if !packaged_default.exists() {
        // Where this machine keeps PostgreSQL 15, as an operator's drop-in would say.
        let dir = testkit::pg_bin_dir(15).expect("PostgreSQL 15");
        overrides.push(("STRATA_PG_BIN_DIRS", dir.display().to_string()));
    }
    machine.serve = Some(start_as_unit(
        &unit,
        &overrides,
        &scratch.join("serve.out"),
        &scratch.join("serve.err"),
    ));
    wait_for("the service's health endpoint", 60, || {
        testkit::listening(port)
    });
    let (status, body) = http_get(port, "/healthz");
    assert!(
        status.contains("200") && body.trim() == "ok",
        "{status} {body}"
    );

    // Its state is the strata user's, private.
    let key_file = Path::new(DATA).join("admin-key.json");
    wait_for("the admin key", 30, || key_file.exists());
    for file in ["admin-key.json", "catalog.db"] {
        let path = format!("{DATA}/{file}");
        assert_eq!(
            stat(&path),
            (0o600, "strata".into(), "strata".into()),
            "{path}"
        );
    }

    // A tiny cluster, registered through the API: the service backs it up
    // at once and drills the backup (a scratch server run as strata under
    // /var/lib/strata/instances).
    let pg = Cluster::start_default(15);
    pg.psql(
        "postgres",
        "CREATE TABLE packaged (id int PRIMARY KEY, note text); \
         INSERT INTO packaged SELECT g, 'row ' || g FROM generate_series(1, 100) g",
    );
    let pg_port = pg.port().to_string();
    let (status, reg) = signed_call_with_key(
        &key_file,
        port,
        &[
            ("Action", "StrataRegisterDBInstance"),
            ("DBInstanceId", "pkg"),
            ("Host", "127.0.0.1"),
            ("Port", &pg_port),
            ("User", "postgres"),
        ],
    );
    assert!(status.contains("200"), "{status}: {reg}");
    let mut backup = serde_json::Value::Null;
    wait_for("the service's first backup and its drill", 300, || {
        let (_, v) = signed_call_with_key(
            &key_file,
            port,
            &[("Action", "DescribeBackups"), ("DBInstanceId", "pkg")],
        );
        let items = v["Items"]["Backup"].as_array().cloned().unwrap_or_default();
        if let Some(b) = items.iter().find(|b| b["BackupStatus"] == "Failed") {
            panic!("the backup failed: {b}");
        }
        let drilled = |b: &&serde_json::Value| {
            b["StrataDrillStatus"]
                .as_str()
                .is_some_and(|s| s != "Running" && s != "Pending")
        };
        match items.iter().find(drilled) {
            Some(b) => {
                backup = b.clone();
                true
            }
            None => false,
        }
    });
    assert_eq!(backup["BackupStatus"], "Success", "{backup}");
    assert_eq!(backup["StrataDrillStatus"], "Passed", "{backup}");
    let (_, metrics) = http_get(port, "/metrics");
    assert!(
        metrics.contains("strata_last_backup_size_bytes{instance=\"pkg\"}"),
        "{metrics}"
    );
    // The repository is where the packaged configuration puts it, the service's own.
    assert_eq!(
        std::fs::metadata(Path::new(DATA).join("repo"))
            .unwrap()
            .uid(),
        uid
    );

    // The operator's CLI, as strata on the same configuration, restores it:
    // the rows come back.
    let sets: Vec<serde_json::Value> =
        serde_json::from_str(&cli(&["backup", "list", "pkg", "--json"])).unwrap();
    assert!(sets.iter().any(|s| s["status"] == "Success"), "{sets:?}");
    let target = format!("{DATA}/restore-check");
    let restored_port = testkit::free_port().to_string();
    cli(&[
        "restore",
        "pkg",
        "--target-dir",
        &target,
        "--start",
        "--port",
        &restored_port,
    ]);
    let psql = testkit::pg_bin_dir(15).unwrap().join("psql");
    let rows = ok(Command::new(&psql).args([
        "-h",
        "127.0.0.1",
        "-p",
        &restored_port,
        "-U",
        "postgres",
        "-d",
        "postgres",
        "-Atc",
        "SELECT count(*) || ' ' || md5(string_agg(note, ',' ORDER BY id)) FROM packaged",
    ]));
    assert_eq!(
        rows.trim(),
        pg.psql(
            "postgres",
            "SELECT count(*) || ' ' || md5(string_agg(note, ',' ORDER BY id)) FROM packaged"
        )
    );
    assert!(rows.starts_with("100 "), "{rows}");
    assert_eq!(
        std::fs::metadata(&target).unwrap().uid(),
        uid,
        "the restored server runs as strata"
    );
    let pg_ctl = testkit::pg_bin_dir(15).unwrap().join("pg_ctl");
    ok(Command::new("runuser")
        .args(["-u", "strata", "--"])
        .arg(pg_ctl)
        .args(["-D", &target, "-m", "fast", "-w", "stop"])
        .current_dir(DATA));

    // Stopped as systemd stops it; what went to the journal never holds the secret.
    let (clean, out, err) = machine.stop_serve();
    assert!(clean, "serve exited with an error:\n{out}\n{err}");
    assert!(
        out.contains(&format!("API listening on http://127.0.0.1:{port}/")),
        "{out}"
    );
    let key: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&key_file).unwrap()).unwrap();
    let secret = key["AccessKeySecret"].as_str().unwrap();
    assert!(!out.contains(secret) && !err.contains(secret));
    assert!(!err.contains('\u{1b}'), "colour codes in the log: {err}");

    // The agent, configured in /etc/default/strata-agent, serves a data
    // directory on a file system with reflinks as the directory's owner.
    if let Some(fs) = testkit::LoopFs::or_skip(testkit::FsKind::Xfs, 300, true) {
        let data = common::agent::fake_data_dir(fs.path());
        let agent_port = testkit::free_port();
        let defaults = std::fs::read_to_string("/etc/default/strata-agent").unwrap();
        assert!(defaults.contains("\nDATA_DIR=\n"), "{defaults}");
        std::fs::write(
            "/etc/default/strata-agent",
            defaults
                .replace("\nDATA_DIR=\n", &format!("\nDATA_DIR={}\n", data.display()))
                .replace("\nLISTEN=\n", &format!("\nLISTEN=127.0.0.1:{agent_port}\n")),
        )
        .unwrap();
        let agent_unit = service_section(AGENT_UNIT);
        assert!(
            !agent_unit.contains_key("User"),
            "started as root, it drops to the owner"
        );
        let mut agent = KillOnDrop(
            agent_command(&agent_unit)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        );
        let mut first = String::new();
        let stderr = agent.0.stderr.take().unwrap();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stderr), &mut first).unwrap();
        let postgres_uid = std::fs::metadata(&data).unwrap().uid();
        assert!(first.contains("strata agent serving"), "{first}");
        assert!(
            first.contains(&format!("as uid {postgres_uid} ")),
            "{first}"
        );
        let snapshots = fs.path().join("strata-snapshots");
        let meta = std::fs::metadata(&snapshots).unwrap();
        assert_eq!((meta.uid(), meta.mode() & 0o777), (postgres_uid, 0o700));
        drop(agent);
    }

    // Upgraded (installed again over itself): the administrator's change to
    // the configuration, its mode and the data stay.
    let edited = format!(
        "{}\n# site change\n",
        std::fs::read_to_string(CONFIG).unwrap()
    );
    std::fs::write(CONFIG, &edited).unwrap();
    ok(Command::new("dpkg").args(["--install", &deb]));
    assert_eq!(std::fs::read_to_string(CONFIG).unwrap(), edited);
    assert_eq!(stat(CONFIG), (0o640, "root".into(), "strata".into()));
    assert_eq!(strata_user().unwrap()[2], uid.to_string());
    assert!(Path::new(DATA).join("repo/strata-repo.json").exists());

    // Removed: the program and units go; configuration, data and user stay.
    ok(Command::new("dpkg").args(["--remove", "strata"]));
    assert_eq!(installed_status(), "deinstall ok config-files");
    for gone in ["/usr/bin/strata", UNIT, AGENT_UNIT] {
        assert!(!Path::new(gone).exists(), "{gone} left after remove");
    }
    assert!(Path::new(CONFIG).exists());
    assert!(Path::new(DATA).join("catalog.db").exists());
    assert!(strata_user().is_some());

    // Purged: configuration, overrides and enablement go; the data (the
    // backups) and the user stay unless asked for.
    let purged = ok(Command::new("dpkg").args(["--purge", "strata"]));
    assert!(installed_status().is_empty() || installed_status().contains("not-installed"));
    assert!(!Path::new("/etc/strata").exists());
    assert!(!Path::new(WANTS).exists());
    let overrides_left = ok(Command::new("dpkg-statoverride").arg("--list"));
    assert!(!overrides_left.contains("/etc/strata"), "{overrides_left}");
    assert!(purged.contains("kept /var/lib/strata"), "{purged}");
    assert!(Path::new(DATA).join("repo/strata-repo.json").exists());
    assert!(strata_user().is_some());

    // Installed again over the kept data, then purged with the data.
    ok(Command::new("dpkg").args(["--install", &deb]));
    assert_eq!(strata_user().unwrap()[2], uid.to_string(), "the same user");
    assert!(Path::new(DATA).join("catalog.db").exists());
    assert_eq!(stat(CONFIG), (0o640, "root".into(), "strata".into()));
    ok(Command::new("dpkg")
        .args(["--purge", "strata"])
        .env("STRATA_PURGE_DATA", "yes"));
    assert!(!Path::new(DATA).exists());
    assert!(strata_user().is_none() && !group_exists());
    assert!(!Path::new("/usr/bin/strata").exists());
    drop(machine);
    assert!(!scratch.exists());
}
