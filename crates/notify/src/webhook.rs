//! Webhooks: an event's JSON body POSTed to an `http(s)` URL, signed so the
//! receiver can tell it came from this Strata and was not replayed much
//! later. The signature is HMAC-SHA256 under the sink's secret over
//! `<timestamp>.<body>`, sent as `X-Strata-Signature: sha256=<hex>` with the
//! timestamp (Unix seconds) in `X-Strata-Timestamp`. Connection failures,
//! timeouts, `429` and `5xx` answers are retried with doubling waits, a
//! bounded number of times; other answers are final.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hmac::{Hmac, KeyInit, Mac};
use http_body_util::Full;
use hyper::{Request, Uri};
use hyper_util::rt::TokioIo;
use sha2::Sha256;
use tokio::net::TcpStream;

use crate::{check_name, Delivered, Event, NotifyError, Route};

/// The header carrying `sha256=<hex>`.
pub const SIGNATURE_HEADER: &str = "X-Strata-Signature";
/// The header carrying the signing time (Unix seconds).
pub const TIMESTAMP_HEADER: &str = "X-Strata-Timestamp";

/// Longest wait between two attempts.
const BACKOFF_MAX: Duration = Duration::from_secs(60);

/// A webhook as configured.
#[derive(Clone)]
pub struct WebhookSpec {
    /// Its name.
    pub name: String,
    /// Where to POST (`http://` or `https://`).
    pub url: String,
    /// The HMAC key.
    pub secret: Vec<u8>,
    /// Which events it receives.
    pub route: Route,
    /// Attempts after the first one.
    pub retries: u32,
    /// The wait before the first retry (doubling after each).
    pub backoff: Duration,
    /// Limit on connecting and on waiting for the answer, per attempt.
    pub timeout: Duration,
}

/// A webhook ready to deliver.
pub struct WebhookSink {
    spec: WebhookSpec,
    uri: Uri,
    host: String,
    port: u16,
    tls: Option<tokio_rustls::TlsConnector>,
}

impl std::fmt::Debug for WebhookSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The secret stays out of logs, and so do the URL's path and query (chat webhooks
        // carry their token there): the target shows the scheme and host only.
        f.debug_struct("WebhookSink")
            .field("name", &self.spec.name)
            .field("target", &self.target())
            .finish_non_exhaustive()
    }
}

/// `sha256=<hex>` of HMAC-SHA256 under `secret` over `<timestamp>.<body>`.
pub fn sign(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    format!(
        "sha256={}",
        hex::encode(mac(secret, timestamp, body).finalize().into_bytes())
    )
}

/// Whether `signature` (a header's value) signs `body` at `timestamp` under
/// `secret`; compared in constant time.
pub fn verify(secret: &[u8], timestamp: i64, body: &[u8], signature: &str) -> bool {
    let Some(bytes) = signature
        .strip_prefix("sha256=")
        .and_then(|h| hex::decode(h).ok())
    else {
        return false;
    };
    mac(secret, timestamp, body).verify_slice(&bytes).is_ok()
}

fn mac(secret: &[u8], timestamp: i64, body: &[u8]) -> Hmac<Sha256> {
    let mut mac =
        <Hmac<Sha256> as KeyInit>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// Why one attempt failed, and whether another may succeed.
struct AttemptError {
    reason: String,
    transient: bool,
}

impl AttemptError {
    fn transient(reason: impl Into<String>) -> Self {
        AttemptError {
            reason: reason.into(),
            transient: true,
        }
    }
}

impl WebhookSink {
    /// Checks `spec`: a name, an `http(s)` URL with a host and no user
    /// information, a secret.
    pub fn new(spec: WebhookSpec) -> Result<Self, NotifyError> {
        check_name(&spec.name)?;
        let refuse = |reason: String| NotifyError::Config {
            sink: spec.name.clone(),
            reason,
        };
        let lower = spec.url.to_ascii_lowercase();
        if !lower.starts_with("http://") && !lower.starts_with("https://") {
            return Err(refuse("the URL must start with http:// or https://".into()));
        }
        let uri: Uri = spec
            .url
            .parse()
            .map_err(|e| refuse(format!("URL {:?}: {e}", spec.url)))?;
        let https = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => return Err(refuse("the URL must start with http:// or https://".into())),
        };
        let authority = uri
            .authority()
            .ok_or_else(|| refuse("the URL has no host".into()))?;
        if authority.as_str().contains('@') {
            return Err(refuse(
                "the URL must not carry user information; the signature authenticates".into(),
            ));
        }
        let host = authority.host().trim_matches(['[', ']']).to_string();
        if host.is_empty() {
            return Err(refuse("the URL has no host".into()));
        }
        let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
        if spec.secret.is_empty() {
            return Err(refuse("the secret is empty".into()));
        }
        let tls = https.then(tls_connector);
        Ok(WebhookSink {
            spec,
            uri,
            host,
            port,
            tls,
        })
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// Which events it receives.
    pub fn route(&self) -> &Route {
        &self.spec.route
    }

    /// Where it posts, for people: scheme, host and port only, as hosted
    /// webhooks often carry a token in their path or query.
    pub fn target(&self) -> String {
        let scheme = self.uri.scheme_str().unwrap_or("http");
        let authority = self.uri.authority().map(|a| a.as_str()).unwrap_or("");
        let hidden = !matches!(self.uri.path(), "" | "/") || self.uri.query().is_some();
        format!("{scheme}://{authority}/{}", if hidden { "…" } else { "" })
    }

    /// POSTs `event`, retrying transient failures with doubling waits.
    pub async fn deliver(&self, event: &Event) -> Result<Delivered, NotifyError> {
        let body = Bytes::from(event.to_json());
        let mut wait = self.spec.backoff;
        let mut attempts = 0;
        loop {
            attempts += 1;
            match self.attempt(event, body.clone()).await {
                Ok(answer) => return Ok(Delivered { attempts, answer }),
                Err(e) if e.transient && attempts <= self.spec.retries => {
                    tracing::debug!(
                        sink = %self.spec.name,
                        "webhook attempt {attempts} failed: {}; retrying in {wait:?}",
                        e.reason
                    );
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(BACKOFF_MAX);
                }
                Err(e) => {
                    return Err(NotifyError::Failed {
                        attempts,
                        reason: e.reason,
                    })
                }
            }
        }
    }

    /// One POST, signed at the time of sending.
    async fn attempt(&self, event: &Event, body: Bytes) -> Result<String, AttemptError> {
        let timestamp = chrono::Utc::now().timestamp();
        let path = self
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string();
        let authority = self.uri.authority().map_or("", |a| a.as_str()).to_string();
        let request = Request::post(path)
            .header(hyper::header::HOST, authority)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header(hyper::header::USER_AGENT, "strata-notify")
            .header("X-Strata-Event", event.kind.as_str())
            .header(TIMESTAMP_HEADER, timestamp.to_string())
            .header(SIGNATURE_HEADER, sign(&self.spec.secret, timestamp, &body))
            .body(Full::new(body))
            .map_err(|e| AttemptError {
                reason: e.to_string(),
                transient: false,
            })?;
        let exchange = async {
            let mut sender = self.connect().await?;
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| AttemptError::transient(e.to_string()))?;
            // Only the status matters; the body is never read, so a receiver
            // cannot make this process buffer an endless answer.
            Ok::<_, AttemptError>(response.status())
        };
        let status = tokio::time::timeout(self.spec.timeout, exchange)
            .await
            .map_err(|_| {
                AttemptError::transient(format!("no answer within {:?}", self.spec.timeout))
            })??;
        let answer = format!("HTTP {}", status.as_u16());
        if status.is_success() {
            Ok(answer)
        } else {
            Err(AttemptError {
                transient: status.is_server_error() || status.as_u16() == 429,
                reason: answer,
            })
        }
    }

    async fn connect(
        &self,
    ) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>, AttemptError> {
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| {
                AttemptError::transient(format!("connecting to {}:{}: {e}", self.host, self.port))
            })?;
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            None => handshake(tcp).await,
            Some(connector) => {
                let name =
                    rustls::pki_types::ServerName::try_from(self.host.clone()).map_err(|e| {
                        AttemptError {
                            reason: format!("host name for TLS: {e}"),
                            transient: false,
                        }
                    })?;
                let stream = connector
                    .connect(name, tcp)
                    .await
                    .map_err(|e| AttemptError::transient(format!("TLS: {e}")))?;
                handshake(stream).await
            }
        }
    }
}

async fn handshake<S>(
    stream: S,
) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>, AttemptError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| AttemptError::transient(e.to_string()))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!("webhook connection: {e}");
        }
    });
    Ok(sender)
}

/// TLS with the system's trusted roots.
fn tls_connector() -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("ring supports the default protocol versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(url: &str) -> WebhookSpec {
        WebhookSpec {
            name: "w".into(),
            url: url.into(),
            secret: b"s".to_vec(),
            route: Route::default(),
            retries: 0,
            backoff: Duration::from_millis(1),
            timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn targets_show_no_path_or_query() {
        let target = |url: &str| WebhookSink::new(spec(url)).unwrap().target();
        assert_eq!(
            target("https://hooks.example.com/services/T0/B0/token"),
            "https://hooks.example.com/…"
        );
        assert_eq!(
            target("http://127.0.0.1:9/?key=abc"),
            "http://127.0.0.1:9/…"
        );
        assert_eq!(target("http://127.0.0.1:9/"), "http://127.0.0.1:9/");
        let sink =
            WebhookSink::new(spec("https://hooks.example.com/services/T0/B0/token")).unwrap();
        let shown = format!("{sink:?}");
        assert!(
            !shown.contains("token") && !shown.contains("services"),
            "{shown}"
        );
        assert!(shown.contains("https://hooks.example.com/…"), "{shown}");
    }

    #[test]
    fn only_http_and_https_urls_are_accepted() {
        assert!(WebhookSink::new(spec("http://127.0.0.1:9/hook")).is_ok());
        assert!(WebhookSink::new(spec("https://hooks.example.com/x?y=1")).is_ok());
        for bad in [
            "file:///etc/passwd",
            "ftp://example.com/",
            "gopher://x/",
            "example.com/hook",
            "http://user:pw@example.com/",
            "http:///nohost",
            "",
        ] {
            assert!(WebhookSink::new(spec(bad)).is_err(), "{bad}");
        }
        let mut s = spec("http://x/");
        s.secret.clear();
        assert!(WebhookSink::new(s).is_err());
    }

    #[test]
    fn signatures_cover_timestamp_and_body() {
        let sig = sign(b"k", 100, b"{}");
        assert!(sig.starts_with("sha256=") && sig.len() == 7 + 64);
        assert!(verify(b"k", 100, b"{}", &sig));
        assert!(!verify(b"other", 100, b"{}", &sig));
        assert!(!verify(b"k", 101, b"{}", &sig));
        assert!(!verify(b"k", 100, b"{ }", &sig));
        assert!(!verify(b"k", 100, b"{}", "sha256=zz"));
        assert!(!verify(b"k", 100, b"{}", &sig[7..]));
    }
}
