//! End-to-end check of the decoder against a real PostgreSQL 15 cluster: the commits,
//! aborts and restore points we find must match what SQL reported and what `pg_waldump`
//! (PostgreSQL's own reader) prints for the same segments.

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use pg_wal::decode::{WalDecoder, WalEvent};
use pg_wal::{parse_size_setting, Lsn, SegmentNo, WalGeometry};

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// A throw-away cluster, stopped (immediately) when dropped, even if the test panics.
struct Cluster {
    _dir: tempfile::TempDir,
    data: PathBuf,
    port: u16,
    /// PostgreSQL refuses to run as root, so as root we run its tools as `postgres`.
    as_postgres: bool,
    started: bool,
}

impl Cluster {
    fn start() -> Cluster {
        let dir = tempfile::tempdir().expect("create temp dir");
        let data = dir.path().join("data");
        let as_postgres = run(Command::new("id").arg("-u")).trim() == "0";
        if as_postgres {
            run(Command::new("chown").arg("postgres:").arg(dir.path()));
        }
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("find a free port")
            .port();
        let mut cluster = Cluster {
            _dir: dir,
            data,
            port,
            as_postgres,
            started: false,
        };
        let data = cluster.data.display().to_string();
        run(cluster
            .pg("initdb")
            .args(["-D", &data, "-U", "postgres", "-A", "trust", "--no-sync"]));
        let options = format!(
            "-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories='' \
             -c wal_level=replica -c track_commit_timestamp=on -c fsync=off"
        );
        let log = cluster.data.join("server.log").display().to_string();
        cluster.started = true;
        run(cluster
            .pg("pg_ctl")
            .args(["-D", &data, "-l", &log, "-o", &options, "-w", "start"]));
        cluster
    }

    fn pg(&self, tool: &str) -> Command {
        let path = format!("{PG_BIN}/{tool}");
        let mut cmd = if self.as_postgres {
            let mut cmd = Command::new("runuser");
            cmd.args(["-u", "postgres", "--", "env", "TZ=UTC", &path]);
            cmd
        } else {
            let mut cmd = Command::new(path);
            cmd.env("TZ", "UTC");
            cmd
        };
        cmd.current_dir("/");
        cmd
    }

    /// Runs one simple-query string (one implicit or explicit transaction) and returns
    /// the unaligned, tuples-only output.
    fn psql(&self, sql: &str) -> String {
        let port = self.port.to_string();
        let out = run(self.pg("psql").args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            sql,
        ]));
        out.trim().to_owned()
    }

    fn wal_dir(&self) -> PathBuf {
        self.data.join("pg_wal")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.started {
            let data = self.data.display().to_string();
            let _ = self
                .pg("pg_ctl")
                .args(["-D", &data, "-m", "immediate", "-w", "stop"])
                .output();
        }
    }
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    check(cmd, &out);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn check(cmd: &Command, out: &Output) {
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs one transaction that also reports its xid, returning that xid.
fn xid_of(cluster: &Cluster, body: &str, end: &str) -> u32 {
    let out = cluster.psql(&format!("BEGIN; {body}; SELECT txid_current(); {end};"));
    let txid: u64 = out.parse().unwrap_or_else(|_| panic!("txid from {out:?}"));
    // txid_current() carries the epoch in the high bits; WAL stores the 32-bit xid.
    (txid & 0xFFFF_FFFF) as u32
}

fn segment_files(dir: &Path, geometry: WalGeometry, last: SegmentNo) -> Vec<(SegmentNo, PathBuf)> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .expect("list pg_wal")
        .filter_map(|entry| {
            let path = entry.ok()?.path();
            let name = path.file_name()?.to_str()?;
            let (_, seg) = geometry.parse_segment_file_name(name)?;
            (seg <= last).then_some((seg, path))
        })
        .collect();
    files.sort();
    files
}

fn pg_time(t: &chrono::DateTime<chrono::Utc>) -> String {
    // timestamptz_to_str's format in frontend programs, with TZ=UTC.
    t.format("%Y-%m-%d %H:%M:%S%.6f UTC").to_string()
}

/// `(lsn, xid, "COMMIT"/"ABORT", time)` of every transaction end pg_waldump reports.
fn waldump_xact_ends(
    cluster: &Cluster,
    first: &Path,
    last: &Path,
) -> BTreeSet<(Lsn, u32, String, String)> {
    let wal = cluster.wal_dir().display().to_string();
    // pg_waldump exits non-zero when it reaches the end of valid WAL; its stdout is complete.
    let out = cluster
        .pg("pg_waldump")
        .args(["-p", &wal, "-r", "Transaction"])
        .arg(first.file_name().expect("file name"))
        .arg(last.file_name().expect("file name"))
        .output()
        .expect("run pg_waldump");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mut ends = BTreeSet::new();
    for line in stdout.lines() {
        let field = |key: &str| {
            let rest = &line[line.find(key)? + key.len()..];
            Some(rest.trim_start().split([',', ' ']).next()?.to_owned())
        };
        let Some(desc) = line.split("desc: ").nth(1) else {
            continue;
        };
        let (kind, time) = desc.split_once(' ').unwrap_or((desc, ""));
        if kind != "COMMIT" && kind != "ABORT" {
            continue;
        }
        // The description may continue after the time ("; inval msgs: ...").
        let time = time.split(';').next().unwrap_or("").trim().to_owned();
        let lsn: Lsn = field("lsn:").expect("lsn field").parse().expect("lsn");
        let xid: u32 = field("tx:").expect("tx field").parse().expect("xid");
        ends.insert((lsn, xid, kind.to_owned(), time));
    }
    assert!(
        !ends.is_empty(),
        "pg_waldump printed nothing useful:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ends
}

#[test]
fn decodes_real_pg15_wal_like_pg_waldump() {
    let cluster = Cluster::start();
    let geometry = WalGeometry::new(
        parse_size_setting(&cluster.psql("SHOW wal_segment_size")).expect("segment size"),
    )
    .expect("geometry");

    let create = xid_of(&cluster, "CREATE TABLE t (id int, note text)", "COMMIT");
    let mut committed = vec![create];
    for i in 0..3 {
        committed.push(xid_of(
            &cluster,
            &format!(
                "INSERT INTO t SELECT g, repeat('x', 200) FROM generate_series(1, {}) g",
                50 * (i + 1)
            ),
            "COMMIT",
        ));
    }
    let aborted = xid_of(
        &cluster,
        "INSERT INTO t VALUES (-1, 'rolled back')",
        "ROLLBACK",
    );
    committed.push(xid_of(
        &cluster,
        "INSERT INTO t VALUES (99, 'last')",
        "COMMIT",
    ));
    let commit_times: Vec<String> = committed
        .iter()
        .map(|xid| {
            cluster.psql(&format!(
                "SELECT to_char(pg_xact_commit_timestamp('{xid}'::xid) AT TIME ZONE 'UTC', \
                 'YYYY-MM-DD HH24:MI:SS.US') || ' UTC'"
            ))
        })
        .collect();
    let rp_end: Lsn = cluster
        .psql("SELECT pg_create_restore_point('rp1')")
        .parse()
        .expect("restore point lsn");
    let switch_end: Lsn = cluster
        .psql("SELECT pg_switch_wal()")
        .parse()
        .expect("switch lsn");

    let last_segment = geometry.segment_of(Lsn(switch_end.0 - 1));
    let files = segment_files(&cluster.wal_dir(), geometry, last_segment);
    assert!(!files.is_empty());

    // Each file on its own, in odd chunk sizes, and all files as one continuous stream.
    let mut per_file = Vec::new();
    let mut stream = WalDecoder::new(geometry, geometry.segment_start(files[0].0));
    let mut streamed = Vec::new();
    for (seg, path) in &files {
        let bytes = std::fs::read(path).expect("read segment");
        let mut decoder = WalDecoder::new(geometry, geometry.segment_start(*seg));
        for chunk in bytes.chunks(777) {
            per_file.extend(decoder.feed(chunk).expect("decode"));
        }
        assert_eq!(
            decoder.position(),
            geometry.segment_start(*seg) + bytes.len() as u64
        );
        for chunk in bytes.chunks(4096) {
            streamed.extend(stream.feed(chunk).expect("decode stream"));
        }
    }
    assert_eq!(per_file, streamed);
    let events = per_file;

    for (xid, time) in committed.iter().zip(&commit_times) {
        let found: Vec<_> = events
            .iter()
            .filter_map(|e| match e {
                WalEvent::Commit { xid: x, time, .. } if x == xid => Some(pg_time(time)),
                _ => None,
            })
            .collect();
        assert_eq!(found, vec![time.clone()], "commit of xid {xid}");
    }
    assert!(
        events
            .iter()
            .any(|e| matches!(e, WalEvent::Abort { xid, .. } if *xid == aborted)),
        "abort of xid {aborted} not found in {events:#?}"
    );
    let restore_points: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            WalEvent::RestorePoint { name, end_lsn, .. } => Some((name.as_str(), *end_lsn)),
            _ => None,
        })
        .collect();
    // pg_create_restore_point returns the end of its record.
    assert_eq!(restore_points, vec![("rp1", rp_end)]);
    let switches: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            WalEvent::Switch { lsn } => Some(*lsn),
            _ => None,
        })
        .collect();
    // pg_switch_wal returns the end of the (header-only, 24 byte) switch record.
    assert_eq!(switches.last(), Some(&Lsn(switch_end.0 - 24)));

    // Every transaction end, with its time, exactly as PostgreSQL's own reader sees them.
    let ours: BTreeSet<_> = events
        .iter()
        .filter_map(|e| match e {
            WalEvent::Commit { lsn, xid, time, .. } => {
                Some((*lsn, *xid, "COMMIT".to_owned(), pg_time(time)))
            }
            WalEvent::Abort { lsn, xid, time, .. } => {
                Some((*lsn, *xid, "ABORT".to_owned(), pg_time(time)))
            }
            _ => None,
        })
        .collect();
    let (first, last) = (&files[0].1, &files[files.len() - 1].1);
    assert_eq!(ours, waldump_xact_ends(&cluster, first, last));
}
