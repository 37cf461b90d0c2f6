//! `strata notify test`: a test event to each configured sink, each result
//! reported, a failing sink making the command fail; `--sink` picks one.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

use common::Strata;

/// The timestamp, signature and body of a request.
type Received = (i64, String, Vec<u8>);

/// A webhook receiver on 127.0.0.1 answering 200; returns its URL and what
/// each request brought.
fn receiver() -> (String, Arc<Mutex<Vec<Received>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/strata", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let mut reader = BufReader::new(stream.unwrap());
            let (mut len, mut ts, mut sig) = (0usize, 0i64, String::new());
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                let line = line.trim_end();
                if line.is_empty() {
                    break;
                }
                if let Some((n, v)) = line.split_once(':') {
                    match n.to_ascii_lowercase().as_str() {
                        "content-length" => len = v.trim().parse().unwrap(),
                        "x-strata-timestamp" => ts = v.trim().parse().unwrap(),
                        "x-strata-signature" => sig = v.trim().to_string(),
                        _ => {}
                    }
                }
            }
            let mut body = vec![0; len];
            reader.read_exact(&mut body).unwrap();
            log.lock().unwrap().push((ts, sig, body));
            let _ = reader
                .into_inner()
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        }
    });
    (url, seen)
}

#[test]
fn notify_test_reports_every_sink() {
    let (url, seen) = receiver();
    let closed = TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("http://{}/", closed.local_addr().unwrap());
    drop(closed);
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("hook.secret");
    std::fs::write(&secret, "test-secret\n").unwrap();
    let strata = Strata::with_config(
        "notify",
        "",
        &format!(
            "[notify]\n\
             [[notify.webhook]]\nname = \"ops\"\nurl = \"{url}\"\nsecret_file = {secret:?}\nevents = [\"backup-failed\"]\n\
             [[notify.webhook]]\nname = \"gone\"\nurl = \"{dead}\"\nsecret_file = {secret:?}\nretries = 0\n",
            secret = secret.display().to_string()
        ),
    );

    let out = strata.run(&["notify", "test"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stdout}\n{stderr}");
    assert!(stderr.contains("1 of 2 sink(s) failed"), "{stderr}");
    let ops = stdout.lines().find(|l| l.starts_with("ops ")).unwrap();
    assert!(ops.contains("delivered: HTTP 200 (1 attempt(s))"), "{ops}");
    let gone = stdout.lines().find(|l| l.starts_with("gone ")).unwrap();
    assert!(gone.contains("FAILED: connecting to 127.0.0.1"), "{gone}");

    // The test event passes the sink's event filter, signed with its secret.
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 1);
        let (ts, sig, body) = &seen[0];
        let event: serde_json::Value = serde_json::from_slice(body).unwrap();
        assert_eq!(event["kind"], "test");
        assert!(event["instance"].is_null());
        assert!(strata_notify::verify(b"test-secret", *ts, body, sig));
    }

    let json = strata.ok(&["notify", "test", "--sink", "ops", "--json"]);
    let rows: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(rows.as_array().unwrap().len(), 1);
    assert_eq!(rows[0]["sink"], "ops");
    assert_eq!(rows[0]["delivered"], true);
    assert_eq!(seen.lock().unwrap().len(), 2);

    let out = strata.run(&["notify", "test", "--sink", "nobody"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no notification sink is named"));
}
