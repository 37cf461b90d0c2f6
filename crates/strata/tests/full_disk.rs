//! A repository on a small real file system (a tmpfs mounted for the test)
//! that fills up, and how a registered server's TLS is verified.
//!
//! - Without the free-space guard, a backup that fills the file system
//!   fails with the file system's own error (`No space left on device`),
//!   recorded on the backup set, never "the block writer stopped".
//! - With the guard (`[local_repository] min_free_bytes`), writes stop
//!   while the minimum is still free; the WAL receiver that cannot store
//!   says `Failing: <cause>` in the API and is down in `/metrics`, logs at
//!   WARN/ERROR, and streams again once space is freed.
//! - A server registered with `sslmode=verify-full` is backed up and
//!   archived over verified TLS; a wrong host name or an unknown CA is
//!   refused at registration; the default `prefer` is warned about.
//!
//! Mounting needs root (the test machines and CI run as root).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{add_args, http_get, wait_for, Server, Strata};
use testkit::Cluster;

const MIB: u64 = 1024 * 1024;

/// A tmpfs of `size_mb` MiB mounted on a fresh directory; unmounted (and
/// the directory removed) on drop.
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    fn mount(size_mb: u64) -> Tmpfs {
        let dir = testkit::temp_dir("strata-tmpfs-");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mb}m,mode=0755")])
            .arg("tmpfs")
            .arg(&dir)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mounting a tmpfs (needs root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs { dir }
    }

    /// Bytes available to unprivileged writers (what the guard measures).
    fn free(&self) -> u64 {
        free_bytes(&self.dir)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let umounted = Command::new("umount")
            .arg(&self.dir)
            .status()
            .is_ok_and(|s| s.success());
        if !umounted {
            // Still busy (a process of a failed test): detach it.
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

// The statvfs fields are 32-bit on some targets, 64-bit on others.
#[allow(clippy::unnecessary_cast)]
fn free_bytes(dir: &Path) -> u64 {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).unwrap();
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: a NUL-terminated path and a pointer to a statvfs struct.
    let rc = unsafe { libc::statvfs(path.as_ptr(), st.as_mut_ptr()) };
    assert_eq!(rc, 0, "statvfs {}", dir.display());
    // SAFETY: statvfs returned 0 and filled the struct.
    let st = unsafe { st.assume_init() };
    st.f_bavail as u64 * st.f_frsize as u64
}

/// Adds `mb` MiB of random (incompressible) bytes to `cluster`, 1 MiB a row.
fn add_random_data(cluster: &Cluster, table: &str, mb: u64) {
    cluster.psql(
        "postgres",
        &format!(
            "CREATE TABLE IF NOT EXISTS {table} (b bytea); \
             ALTER TABLE {table} ALTER b SET STORAGE EXTERNAL; \
             INSERT INTO {table} SELECT decode(string_agg(md5(random()::text || g), ''), 'hex') \
             FROM generate_series(1, 65536) g CROSS JOIN generate_series(1, {mb}) r GROUP BY r"
        ),
    );
}

/// A Strata whose repository is `dir/repo`, with `sections` added and the
/// `[wal]` table given `wal_extra` lines.
fn strata_on(name: &str, dir: &Path, wal_extra: &str, sections: &str) -> Strata {
    let strata = Strata::with_config(
        name,
        &format!(
            "repository = {:?}\n",
            dir.join("repo").display().to_string()
        ),
        sections,
    );
    let text = std::fs::read_to_string(&strata.config).unwrap();
    std::fs::write(
        &strata.config,
        text.replacen("[wal]\n", &format!("[wal]\n{wal_extra}"), 1),
    )
    .unwrap();
    strata
}

#[test]
fn a_backup_that_fills_the_disk_reports_the_file_systems_error() {
    let fs = Tmpfs::mount(24);
    let strata = strata_on(
        "enospc",
        &fs.dir,
        "",
        "[local_repository]\nmin_free_bytes = 0\n",
    );
    let cluster = Cluster::start_default(15);
    // Far more than fits: the writer stops on a pack while the server
    // still streams blocks to hand it (which used to read "the block
    // writer stopped").
    add_random_data(&cluster, "junk", 64);
    strata.add_instance("full", &cluster);

    let err = strata.fails(&["backup", "create", "full"]);
    assert!(err.contains("No space left on device"), "{err}");
    assert!(!err.contains("stopped"), "{err}");
    let sets = strata.backups("full");
    assert_eq!(sets.len(), 1, "{sets:?}");
    assert_eq!(sets[0]["status"], "Failed");
    let recorded = sets[0]["error"].as_str().unwrap_or_default();
    assert!(
        recorded.contains("No space left on device") && !recorded.contains("stopped"),
        "{recorded}"
    );
    // No manifest was committed into the full repository.
    assert!(!common::files_under(&fs.dir.join("repo"))
        .iter()
        .any(|p| p.to_string_lossy().ends_with(".manifest")));
}

/// Signs an RPC call with the admin key and returns the JSON answer.
fn api(server: &Server, key: &(String, String), params: &[(&str, &str)]) -> serde_json::Value {
    let mut all = vec![("Version", "2014-08-15"), ("Format", "JSON")];
    all.extend_from_slice(params);
    let nonce = format!("{:032x}", rand::random::<u128>());
    let query = acs_signature::sign_v2("GET", &all, &key.0, &key.1, chrono::Utc::now(), &nonce);
    let (status, body) = http_get(server.port, &format!("/?{query}"));
    let v: serde_json::Value =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{status}: {e}: {body}"));
    assert!(status.contains("200"), "{status}: {v}");
    v
}

fn admin_key(strata: &Strata) -> (String, String) {
    let path = strata.dir.join("data/admin-key.json");
    wait_for("the admin key", 30, || path.exists());
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    (
        v["AccessKeyId"].as_str().unwrap().to_string(),
        v["AccessKeySecret"].as_str().unwrap().to_string(),
    )
}

/// `StrataWalReceiver` of `id` and its state word, from the API.
fn receiver(server: &Server, key: &(String, String), id: &str) -> (String, String) {
    let v = api(
        server,
        key,
        &[
            ("Action", "DescribeDBInstanceAttribute"),
            ("DBInstanceId", id),
        ],
    );
    let a = &v["Items"]["DBInstanceAttribute"][0];
    (
        a["StrataWalReceiver"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        a["StrataWalReceiverState"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    )
}

/// One raw HTTP/1.1 exchange: the response's head and body.
fn http(port: u16, request: &str) -> (String, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    (head.to_string(), body.to_string())
}

/// The value a response head sets for cookie `name`.
fn set_cookie(head: &str, name: &str) -> String {
    head.lines()
        .filter_map(|l| l.split_once(':'))
        .filter(|(k, _)| k.eq_ignore_ascii_case("set-cookie"))
        .find_map(|(_, v)| v.trim().strip_prefix(&format!("{name}=")))
        .and_then(|v| v.split(';').next())
        .unwrap_or_else(|| panic!("no {name} cookie in {head}"))
        .to_string()
}

/// Signs in to the console with `key`; returns the session cookie.
fn console_session(server: &Server, key: &(String, String)) -> String {
    let (head, _) = http(
        server.port,
        "GET /console/signin HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
    );
    let token = set_cookie(&head, "strata_signin");
    let form = format!(
        "csrf={token}&access_key_id={}&access_key_secret={}&next=%2Fconsole%2Finstances",
        key.0, key.1
    );
    let (head, _) = http(
        server.port,
        &format!(
            "POST /console/signin HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\
             Cookie: strata_signin={token}\r\n\
             Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{form}",
            form.len()
        ),
    );
    set_cookie(&head, "strata_session")
}

/// The console's page of instance `id`.
fn console_page(server: &Server, session: &str, id: &str) -> String {
    let (head, body) = http(
        server.port,
        &format!(
            "GET /console/instances/{id}/backups HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\
             Cookie: strata_session={session}\r\n\r\n"
        ),
    );
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body
}

/// A metric of instance `id` from `/metrics`.
fn metric(server: &Server, name: &str, id: &str) -> Option<f64> {
    let (_, body) = http_get(server.port, "/metrics");
    let prefix = format!("{name}{{instance=\"{id}\"}} ");
    body.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(|v| v.trim().parse().unwrap())
}

#[test]
fn the_guard_keeps_space_free_and_a_receiver_that_cannot_store_says_so() {
    const GUARD: u64 = 8 * MIB;
    let fs = Tmpfs::mount(96);
    // Space the test frees later, as an operator would.
    let ballast = fs.dir.join("ballast");
    std::fs::write(&ballast, vec![1u8; 40 * MIB as usize]).unwrap();
    let strata = strata_on(
        "guard",
        &fs.dir,
        "retry_max_secs = 4\n",
        &format!(
            "[local_repository]\nmin_free_bytes = {GUARD}\nmin_free_percent = 100\n[drills]\nenabled = false\n"
        ),
    );
    let cluster = Cluster::start_default(15);
    let server = Server::start(&strata, &[]);
    let key = admin_key(&strata);

    // Registered with the default sslmode: the answer warns.
    let port = cluster.port().to_string();
    let reg = api(
        &server,
        &key,
        &[
            ("Action", "StrataRegisterDBInstance"),
            ("DBInstanceId", "guarded"),
            ("Host", "127.0.0.1"),
            ("Port", &port),
            ("User", "postgres"),
        ],
    );
    let warnings = reg["Warnings"].as_array().expect("Warnings list");
    assert!(
        warnings
            .iter()
            .any(|w| w.as_str().unwrap().contains("sslmode=prefer")),
        "{reg}"
    );
    assert_eq!(reg["StrataConnectionVerified"], false, "{reg}");

    // The first backup fits; the receiver streams.
    wait_for("the first backup", 120, || {
        strata
            .backups("guarded")
            .iter()
            .any(|b| b["status"] == "Success")
    });
    wait_for("the receiver to stream", 60, || {
        receiver(&server, &key, "guarded").0 == "Streaming"
    });
    assert_eq!(
        metric(&server, "strata_wal_receiver_up", "guarded"),
        Some(1.0)
    );
    assert_eq!(
        metric(&server, "strata_wal_receiver_failing", "guarded"),
        Some(0.0)
    );

    // More WAL than the file system can take above the guard.
    let usable = (fs.free() - GUARD) / MIB;
    add_random_data(&cluster, "junk", usable + 8);
    cluster.psql("postgres", "SELECT pg_switch_wal()");
    wait_for("the receiver to fail", 120, || {
        receiver(&server, &key, "guarded").1 == "Failing"
    });
    let (status, _) = receiver(&server, &key, "guarded");
    assert!(
        status.starts_with("Failing: ") && status.contains("below the minimum"),
        "{status}"
    );
    assert_eq!(
        metric(&server, "strata_wal_receiver_up", "guarded"),
        Some(0.0)
    );
    assert_eq!(
        metric(&server, "strata_wal_receiver_failing", "guarded"),
        Some(1.0)
    );
    assert!(fs.free() >= GUARD, "{} bytes free", fs.free());
    let session = console_session(&server, &key);
    let page = console_page(&server, &session, "guarded");
    assert!(
        page.contains("Log backup is failing") && page.contains("below the minimum"),
        "{page}"
    );
    assert!(page.contains("Connection not verified"), "{page}");

    // A backup now is refused by the guard, with that reason recorded.
    let err = strata.fails(&["backup", "create", "guarded"]);
    assert!(err.contains("below the minimum"), "{err}");
    assert!(!err.contains("stopped"), "{err}");
    let failed: Vec<_> = strata
        .backups("guarded")
        .into_iter()
        .filter(|b| b["status"] == "Failed")
        .collect();
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert!(
        failed[0]["error"]
            .as_str()
            .unwrap()
            .contains("the repository's file system has"),
        "{failed:?}"
    );
    assert!(fs.free() >= GUARD, "{} bytes free", fs.free());

    // Space freed: the receiver stores the WAL the slot kept and streams.
    std::fs::remove_file(&ballast).unwrap();
    wait_for("the receiver to stream again", 120, || {
        receiver(&server, &key, "guarded").0 == "Streaming"
    });
    assert_eq!(
        metric(&server, "strata_wal_receiver_up", "guarded"),
        Some(1.0)
    );
    assert_eq!(
        metric(&server, "strata_wal_receiver_failing", "guarded"),
        Some(0.0)
    );
    assert!(fs.free() >= GUARD, "{} bytes free", fs.free());
    let page = console_page(&server, &session, "guarded");
    assert!(!page.contains("Log backup is failing"), "{page}");
    let lsn = cluster.psql("postgres", "SELECT pg_current_wal_lsn()");
    let lsn: pg_wal::Lsn = lsn.trim().parse().unwrap();
    wait_for("the WAL written while full to be archived", 120, || {
        strata.wal("guarded").iter().any(|w| {
            w["end_lsn"]
                .as_str()
                .unwrap()
                .parse::<pg_wal::Lsn>()
                .unwrap()
                >= lsn
        })
    });

    let (_, _, log) = server.stop();
    assert!(
        log.lines()
            .any(|l| l.contains("WARN") && l.contains("WAL receiver failing")),
        "{log}"
    );
    assert!(
        log.lines()
            .any(|l| l.contains("WARN") && l.contains("streaming again")),
        "{log}"
    );
}

/// A CA that signed nothing the server holds.
fn unrelated_ca(dir: &Path) -> PathBuf {
    let out = Command::new("openssl")
        .args(["req", "-x509", "-nodes", "-days", "1", "-newkey", "ec"])
        .args(["-pkeyopt", "ec_paramgen_curve:prime256v1"])
        .args(["-subj", "/CN=Unrelated CA"])
        .args(["-addext", "basicConstraints=critical,CA:TRUE"])
        .arg("-keyout")
        .arg(dir.join("other-ca.key"))
        .arg("-out")
        .arg(dir.join("other-ca.crt"))
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir.join("other-ca.crt")
}

#[test]
fn verify_full_backs_up_and_archives_and_refuses_a_wrong_server() {
    // Plain-text connections are rejected, so whatever works went over TLS.
    let cluster = Cluster::builder(15)
        .ssl(true)
        .conf("listen_addresses = '127.0.0.1,127.0.0.2'")
        .hba("hostnossl all all 0.0.0.0/0 reject")
        .hba("hostnossl replication all 0.0.0.0/0 reject")
        .hba("hostssl all all 127.0.0.2/32 trust")
        .hba("hostssl replication all 127.0.0.2/32 trust")
        .start();
    let ca = cluster.ca_cert().expect("CA").display().to_string();
    let strata = Strata::new("tls");
    let port = cluster.port().to_string();
    let add = |id: &str, host: &str, extra: &[&str]| {
        let mut args = add_args(id, &port, "postgres");
        args[4] = host;
        args.extend_from_slice(extra);
        strata.run(&args)
    };

    let out = add(
        "verified",
        "localhost",
        &["--sslmode", "verify-full", "--sslrootcert", &ca],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("warning"), "{stderr}");
    let set = strata.backup("verified");
    assert!(strata
        .backups("verified")
        .iter()
        .any(|b| b["id"] == set.as_str() && b["status"] == "Success"));
    let mut receiver = strata.wal_receiver("verified");
    cluster.psql(
        "postgres",
        "CREATE TABLE t AS SELECT generate_series(1, 1000) AS i; SELECT pg_switch_wal()",
    );
    wait_for("a complete WAL segment over TLS", 60, || {
        strata.wal("verified").iter().any(|w| w["partial"] == false)
    });
    receiver.stop();

    // The name in the certificate is localhost/127.0.0.1, not 127.0.0.2.
    let out = add(
        "wrongname",
        "127.0.0.2",
        &["--sslmode", "verify-full", "--sslrootcert", &ca],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("certificate") && stderr.contains("not valid for"),
        "{stderr}"
    );
    // A CA that did not sign the server's certificate.
    let other = unrelated_ca(&strata.dir);
    let out = add(
        "unknownca",
        "localhost",
        &[
            "--sslmode",
            "verify-full",
            "--sslrootcert",
            &other.display().to_string(),
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("certificate"), "{stderr}");
    let listed = strata.ok(&["instance", "list", "--json"]);
    assert!(!listed.contains("wrongname") && !listed.contains("unknownca"));

    // The default: encrypted here, but unverified, and said so.
    let out = add("unverified", "127.0.0.1", &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("warning: instance unverified: sslmode=prefer")
            && stderr.contains("verify-full"),
        "{stderr}"
    );
}
