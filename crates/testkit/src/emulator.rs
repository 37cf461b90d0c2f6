//! What the emulators the tests start (Azurite, fake-gcs-server, moto) have
//! in common: a server started on a free loopback port, its output in a log
//! file, retried when the port was taken in between; and one plain HTTP
//! exchange to set it up.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::free_port;

/// A started server: its process, port and log file.
pub(crate) struct Started {
    pub child: Child,
    pub port: u16,
    pub log: PathBuf,
}

/// Starts `command(port)` on a free port with its output in
/// `log_dir/<name>-<port>.log` and waits up to `wait` for it to accept
/// connections on 127.0.0.1. A port free a moment ago may be taken by the
/// time the server binds it, so three ports are tried; panics with the last
/// log when none works.
pub(crate) fn start_on_free_port(
    name: &str,
    log_dir: &Path,
    wait: Duration,
    mut command: impl FnMut(u16) -> Command,
) -> Started {
    let mut last_log = String::new();
    for _ in 0..3 {
        let port = free_port();
        let log = log_dir.join(format!("{name}-{port}.log"));
        let log_file =
            std::fs::File::create(&log).unwrap_or_else(|e| panic!("create {}: {e}", log.display()));
        let mut child = command(port)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("clone log handle"))
            .stderr(log_file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            if crate::listening(port) {
                return Started { child, port, log };
            }
            if child.try_wait().ok().flatten().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        last_log = std::fs::read_to_string(&log).unwrap_or_default();
    }
    panic!("{name} did not start listening:\n{last_log}");
}

/// Sends `request` (a whole HTTP/1.1 request with `Connection: close`) to
/// 127.0.0.1:`port` and returns the whole answer.
pub(crate) fn http_exchange(port: u16, request: &str) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port))
        .unwrap_or_else(|e| panic!("connect to 127.0.0.1:{port}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("read timeout");
    stream.write_all(request.as_bytes()).expect("send");
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer
}
