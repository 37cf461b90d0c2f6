//! Deliveries to real listeners on 127.0.0.1 started by the tests: an HTTP
//! receiver that records each request (and answers from a script), and an
//! SMTP server speaking just enough of RFC 5321 to accept one message.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use strata_notify::{
    verify, EmailSink, EmailSpec, Event, EventKind, Route, Sink, SmtpSecurity, WebhookSink,
    WebhookSpec, SIGNATURE_HEADER, TIMESTAMP_HEADER,
};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

/// A request the receiver got: header lines (lower-cased names) and body.
#[derive(Debug, Clone)]
struct Received {
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Received {
    fn header(&self, name: &str) -> &str {
        self.headers
            .iter()
            .find(|(n, _)| n == &name.to_ascii_lowercase())
            .map(|(_, v)| v.as_str())
            .unwrap_or_else(|| panic!("no {name} header"))
    }
}

/// Starts an HTTP receiver answering each request with the next status of
/// `script` (the last one repeats); returns its URL and what it received.
async fn receiver(script: Vec<u16>) -> (String, Arc<Mutex<Vec<Received>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hooks/strata?x=1", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let mut reader = BufReader::new(stream);
            let mut request_line = String::new();
            reader.read_line(&mut request_line).await.unwrap();
            assert!(
                request_line.starts_with("POST /hooks/strata?x=1 "),
                "{request_line}"
            );
            let mut headers = Vec::new();
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).await.unwrap();
                let line = line.trim_end();
                if line.is_empty() {
                    break;
                }
                let (n, v) = line.split_once(':').unwrap();
                headers.push((n.trim().to_ascii_lowercase(), v.trim().to_string()));
            }
            let len: usize = headers
                .iter()
                .find(|(n, _)| n == "content-length")
                .map(|(_, v)| v.parse().unwrap())
                .unwrap();
            let mut body = vec![0; len];
            reader.read_exact(&mut body).await.unwrap();
            let n = {
                let mut log = log.lock().unwrap();
                log.push(Received { headers, body });
                log.len()
            };
            let status = script[(n - 1).min(script.len() - 1)];
            let answer =
                format!("HTTP/1.1 {status} X\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok");
            let mut stream = reader.into_inner();
            stream.write_all(answer.as_bytes()).await.unwrap();
            let _ = stream.shutdown().await;
        }
    });
    (url, seen)
}

fn webhook(url: &str, secret: &[u8], retries: u32) -> Sink {
    Sink::Webhook(
        WebhookSink::new(WebhookSpec {
            name: "ops".into(),
            url: url.into(),
            secret: secret.to_vec(),
            route: Route::default(),
            retries,
            backoff: Duration::from_millis(20),
            timeout: Duration::from_secs(10),
        })
        .unwrap(),
    )
}

fn event() -> Event {
    Event::new(
        EventKind::BackupFailed,
        Some("db-1\"\r\nX-Evil: 1"),
        Utc::now(),
        "backup of db-1 failed: connection refused",
    )
    .with_details(serde_json::json!({"job_id": 7, "error": "connection refused"}))
}

#[tokio::test]
async fn a_webhook_receives_a_signed_json_body() {
    let (url, seen) = receiver(vec![200]).await;
    let sink = webhook(&url, b"s3cret", 2);
    let e = event();
    let done = sink.deliver(&e).await.unwrap();
    assert_eq!((done.attempts, done.answer.as_str()), (1, "HTTP 200"));

    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    let r = &seen[0];
    let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(body["kind"], "backup-failed");
    assert_eq!(body["instance"], "db-1\"\r\nX-Evil: 1");
    assert_eq!(body["message"], "backup of db-1 failed: connection refused");
    assert_eq!(body["details"]["job_id"], 7);
    assert_eq!(
        chrono::DateTime::parse_from_rfc3339(body["time"].as_str().unwrap()).unwrap(),
        e.time
    );
    assert_eq!(r.header("content-type"), "application/json");
    assert_eq!(r.header("x-strata-event"), "backup-failed");
    assert!(r.headers.iter().all(|(n, _)| n != "x-evil"));

    let timestamp: i64 = r.header(TIMESTAMP_HEADER).parse().unwrap();
    let signature = r.header(SIGNATURE_HEADER);
    assert!(verify(b"s3cret", timestamp, &r.body, signature));
    assert!(!verify(b"another", timestamp, &r.body, signature));
    assert!(!verify(b"s3cret", timestamp + 1, &r.body, signature));
}

#[tokio::test]
async fn server_errors_are_retried_until_delivered() {
    let (url, seen) = receiver(vec![500, 500, 200]).await;
    let done = webhook(&url, b"k", 3).deliver(&event()).await.unwrap();
    assert_eq!((done.attempts, done.answer.as_str()), (3, "HTTP 200"));
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 3);
    // Every attempt carries the same body, each signed on its own.
    for r in seen.iter() {
        assert_eq!(r.body, seen[0].body);
        let t: i64 = r.header(TIMESTAMP_HEADER).parse().unwrap();
        assert!(verify(b"k", t, &r.body, r.header(SIGNATURE_HEADER)));
    }
}

#[tokio::test]
async fn retries_are_bounded_and_client_errors_are_final() {
    let (url, seen) = receiver(vec![503]).await;
    let err = webhook(&url, b"k", 2).deliver(&event()).await.unwrap_err();
    assert_eq!(err.to_string(), "HTTP 503 (after 3 attempt(s))");
    assert_eq!(seen.lock().unwrap().len(), 3);

    let (url, seen) = receiver(vec![404, 200]).await;
    let err = webhook(&url, b"k", 5).deliver(&event()).await.unwrap_err();
    assert_eq!(err.to_string(), "HTTP 404 (after 1 attempt(s))");
    assert_eq!(seen.lock().unwrap().len(), 1);

    // Nothing listens there: connection refused, retried, then reported.
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/", closed.local_addr().unwrap());
    drop(closed);
    let err = webhook(&url, b"k", 1).deliver(&event()).await.unwrap_err();
    assert!(err.to_string().contains("after 2 attempt(s)"), "{err}");
}

/// What the SMTP server received: envelope and message text.
#[derive(Debug, Default, Clone)]
struct Mail {
    from: String,
    to: Vec<String>,
    data: String,
}

/// An SMTP server accepting messages without TLS or authentication.
async fn smtp_server() -> (u16, Arc<Mutex<Vec<Mail>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let mails = Arc::new(Mutex::new(Vec::new()));
    let log = mails.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let log = log.clone();
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut lines = BufReader::new(read);
                write.write_all(b"220 test ESMTP\r\n").await.unwrap();
                let mut mail = Mail::default();
                loop {
                    let mut line = String::new();
                    if lines.read_line(&mut line).await.unwrap() == 0 {
                        return;
                    }
                    let upper = line.to_ascii_uppercase();
                    let reply: &[u8] = if upper.starts_with("EHLO") {
                        b"250-test\r\n250 8BITMIME\r\n"
                    } else if upper.starts_with("MAIL FROM:") {
                        mail.from = line[10..].trim().to_string();
                        b"250 OK\r\n"
                    } else if upper.starts_with("RCPT TO:") {
                        mail.to.push(line[8..].trim().to_string());
                        b"250 OK\r\n"
                    } else if upper.starts_with("DATA") {
                        write.write_all(b"354 go on\r\n").await.unwrap();
                        loop {
                            let mut l = String::new();
                            lines.read_line(&mut l).await.unwrap();
                            if l == ".\r\n" {
                                break;
                            }
                            mail.data.push_str(&l);
                        }
                        log.lock().unwrap().push(std::mem::take(&mut mail));
                        b"250 queued as 1\r\n"
                    } else if upper.starts_with("QUIT") {
                        write.write_all(b"221 bye\r\n").await.unwrap();
                        return;
                    } else {
                        b"250 OK\r\n"
                    };
                    write.write_all(reply).await.unwrap();
                }
            });
        }
    });
    (port, mails)
}

#[tokio::test]
async fn an_email_arrives_with_subject_and_body() {
    let (port, mails) = smtp_server().await;
    let sink = Sink::Email(
        EmailSink::new(EmailSpec {
            name: "mail".into(),
            host: "127.0.0.1".into(),
            port,
            security: SmtpSecurity::StartTlsOptional,
            credentials: None,
            from: "Strata <strata@example.com>".into(),
            to: vec!["ops@example.com".into(), "dba@example.com".into()],
            route: Route::default(),
            timeout: Duration::from_secs(10),
        })
        .unwrap(),
    );
    let done = sink.deliver(&event()).await.unwrap();
    assert!(done.answer.starts_with("250"), "{}", done.answer);

    let mails = mails.lock().unwrap().clone();
    assert_eq!(mails.len(), 1);
    let m = &mails[0];
    assert_eq!(m.from, "<strata@example.com>");
    assert_eq!(m.to, ["<ops@example.com>", "<dba@example.com>"]);
    let (headers, body) = m.data.split_once("\r\n\r\n").unwrap();
    let subject = headers
        .lines()
        .find_map(|l| l.strip_prefix("Subject: "))
        .unwrap();
    assert_eq!(subject, "[Strata] backup-failed: db-1\"X-Evil: 1");
    assert!(
        !headers.lines().any(|l| l.starts_with("X-Evil")),
        "{headers}"
    );
    assert!(
        body.contains("backup of db-1 failed: connection refused"),
        "{body}"
    );
    assert!(body.contains("event: backup-failed"), "{body}");
    assert!(body.contains("\"job_id\": 7"), "{body}");
}
