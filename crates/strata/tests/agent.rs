//! `strata agent` as an operator runs it, on loop-mounted file systems: refused on ext4 with
//! one line, the key file written 0600 on first start and reused, a shared key file refused,
//! and the agent answering a signed client.

use std::io::BufRead;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use strata_agent::{AgentClient, AgentKey};
use testkit::{FsKind, LoopFs};

/// A minimal data directory (PG_VERSION and pg_control) owned by the postgres OS user.
fn data_dir_on(fs: &LoopFs) -> PathBuf {
    let data = fs.path().join("pg/data");
    std::fs::create_dir_all(data.join("global")).unwrap();
    std::fs::write(data.join("PG_VERSION"), "15\n").unwrap();
    std::fs::write(data.join("global/pg_control"), 42u64.to_ne_bytes()).unwrap();
    let ok = Command::new("chown")
        .args(["-R", "postgres:postgres"])
        .arg(fs.path().join("pg"))
        .status()
        .unwrap();
    assert!(ok.success());
    data
}

fn agent_command(data: &Path, port: u16) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_strata"));
    cmd.args(["agent", "--data-dir"])
        .arg(data)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .env_remove("STRATA_LOG");
    cmd
}

/// Starts the agent and waits for its "serving" line.
fn spawn_agent(data: &Path, port: u16) -> (Child, String) {
    let mut child = agent_command(data, port)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let line = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the agent printed nothing");
    assert!(line.contains("strata agent serving"), "{line}");
    (child, line)
}

fn stop(mut child: Child) {
    // SAFETY: kill(2) on the pid of a child we spawned and have not reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(status.success(), "agent exited with {status}");
}

#[test]
fn strata_agent_refuses_ext4_with_one_line() {
    let Some(fs) = LoopFs::or_skip(FsKind::Ext4, 64, true) else {
        return;
    };
    let data = data_dir_on(&fs);
    let out = agent_command(&data, testkit::free_port()).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr.trim_end(),
        format!(
            "error: data directory {} is on ext4, which cannot clone files; snapshots need a file system with reflink (XFS made with -m reflink=1, or btrfs)",
            data.display()
        )
    );
    assert!(
        !fs.path().join("pg/strata-snapshots/agent.key").exists(),
        "no key written on a refused start"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strata_agent_keeps_its_key_private_and_refuses_a_shared_key_file() {
    let Some(fs) = LoopFs::or_skip(FsKind::Xfs, 300, true) else {
        return;
    };
    let data = data_dir_on(&fs);
    let port = testkit::free_port();
    let (child, line) = spawn_agent(&data, port);
    let key_file = fs.path().join("pg/strata-snapshots/agent.key");
    assert!(
        line.contains(&key_file.display().to_string()) && line.contains("just created"),
        "{line}"
    );
    assert_eq!(
        std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let key = AgentKey::load(&key_file).unwrap();
    let client = AgentClient::new(&format!("http://127.0.0.1:{port}"), key.clone(), None).unwrap();
    let facts = client.facts().await.unwrap();
    assert_eq!(facts.system_identifier, Some(42));
    assert_eq!(facts.fs.fs_type, "xfs");
    assert_eq!(facts.snapshot_dir, fs.path().join("pg/strata-snapshots"));
    assert_eq!(facts.clone_dir, Some(fs.path().join("pg/strata-clones")));
    stop(child);

    // Restarted: the same key.
    let (child, line) = spawn_agent(&data, port);
    assert!(!line.contains("just created"), "{line}");
    assert_eq!(AgentKey::load(&key_file).unwrap(), key);
    stop(child);

    // A key file others may read is refused.
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = agent_command(&data, port).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "key file {} is readable by group or others (mode 0644)",
            key_file.display()
        )),
        "{stderr}"
    );
}
