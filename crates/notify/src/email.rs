//! Email over SMTP (RFC 5321), through `lettre` with rustls: plain, STARTTLS
//! when offered, STARTTLS required, or TLS from the first byte. The subject
//! names the event kind and a sanitized instance id; the instance id,
//! message and details go in the body, so nothing an event carries can add
//! a header (lettre encodes header values; the subject drops control
//! characters besides).

use std::time::Duration;

use lettre::message::{header::ContentType, Mailbox};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

use crate::{check_name, Delivered, Event, NotifyError, Route};

/// How the SMTP connection is protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmtpSecurity {
    /// Plain text (a relay on the same host or network).
    None,
    /// STARTTLS when the server offers it, plain text otherwise.
    StartTlsOptional,
    /// STARTTLS or no delivery.
    StartTlsRequired,
    /// TLS from the first byte (port 465).
    Tls,
}

impl std::str::FromStr for SmtpSecurity {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(SmtpSecurity::None),
            "starttls" => Ok(SmtpSecurity::StartTlsOptional),
            "starttls-required" => Ok(SmtpSecurity::StartTlsRequired),
            "tls" => Ok(SmtpSecurity::Tls),
            other => Err(format!(
                "SMTP security {other:?}: none, starttls, starttls-required or tls"
            )),
        }
    }
}

/// An email sink as configured.
#[derive(Clone)]
pub struct EmailSpec {
    /// Its name.
    pub name: String,
    /// The SMTP server.
    pub host: String,
    /// Its port.
    pub port: u16,
    /// Connection protection.
    pub security: SmtpSecurity,
    /// User and password for AUTH, if the server wants them.
    pub credentials: Option<(String, String)>,
    /// The sender address.
    pub from: String,
    /// The recipients.
    pub to: Vec<String>,
    /// Which events it receives.
    pub route: Route,
    /// Limit on each SMTP exchange.
    pub timeout: Duration,
}

/// An email sink ready to deliver.
pub struct EmailSink {
    name: String,
    server: String,
    route: Route,
    from: Mailbox,
    to: Vec<Mailbox>,
    transport: AsyncSmtpTransport<Tokio1Executor>,
    /// Limit on a whole delivery: the transport's own timeout bounds its connection only,
    /// not the wait for each answer of the server.
    delivery_timeout: Duration,
}

/// SMTP exchanges of one delivery (greeting, EHLO, STARTTLS, AUTH, MAIL, RCPT, DATA, QUIT are
/// more, but most are quick); a delivery may take this many times the spec's timeout.
const EXCHANGES_PER_TIMEOUT: u32 = 4;

impl std::fmt::Debug for EmailSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmailSink")
            .field("name", &self.name)
            .field("to", &self.to)
            .finish_non_exhaustive()
    }
}

impl EmailSink {
    /// Checks `spec` (addresses parse, at least one recipient) and prepares
    /// the transport; nothing connects yet.
    pub fn new(spec: EmailSpec) -> Result<Self, NotifyError> {
        check_name(&spec.name)?;
        let refuse = |reason: String| NotifyError::Config {
            sink: spec.name.clone(),
            reason,
        };
        let mailbox = |a: &str| {
            a.parse::<Mailbox>()
                .map_err(|e| refuse(format!("address {a:?}: {e}")))
        };
        let from = mailbox(&spec.from)?;
        let to = spec
            .to
            .iter()
            .map(|a| mailbox(a))
            .collect::<Result<Vec<_>, _>>()?;
        if to.is_empty() {
            return Err(refuse("no recipient (`to`)".into()));
        }
        let tls = || TlsParameters::new(spec.host.clone()).map_err(|e| refuse(format!("TLS: {e}")));
        let tls = match spec.security {
            SmtpSecurity::None => Tls::None,
            SmtpSecurity::StartTlsOptional => Tls::Opportunistic(tls()?),
            SmtpSecurity::StartTlsRequired => Tls::Required(tls()?),
            SmtpSecurity::Tls => Tls::Wrapper(tls()?),
        };
        let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&spec.host)
            .port(spec.port)
            .tls(tls)
            .timeout(Some(spec.timeout));
        if let Some((user, password)) = &spec.credentials {
            builder = builder.credentials(Credentials::new(user.clone(), password.clone()));
        }
        Ok(EmailSink {
            server: format!("{}:{}", spec.host, spec.port),
            name: spec.name,
            route: spec.route,
            from,
            to,
            transport: builder.build(),
            delivery_timeout: spec.timeout * EXCHANGES_PER_TIMEOUT,
        })
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Which events it receives.
    pub fn route(&self) -> &Route {
        &self.route
    }

    /// Where it sends, for people: the SMTP server and the recipients
    /// (never the credentials).
    pub fn target(&self) -> String {
        let to: Vec<String> = self.to.iter().map(|m| m.email.to_string()).collect();
        format!("{} to {}", self.server, to.join(", "))
    }

    /// Sends `event` as one message to every recipient (one attempt: a
    /// server that refuses now is reported, SMTP servers queue and retry on
    /// their own once they accepted).
    pub async fn deliver(&self, event: &Event) -> Result<Delivered, NotifyError> {
        let failed = |reason: String| NotifyError::Failed {
            attempts: 1,
            reason,
        };
        let mut builder = Message::builder()
            .from(self.from.clone())
            .subject(subject(event))
            .header(ContentType::TEXT_PLAIN);
        for to in &self.to {
            builder = builder.to(to.clone());
        }
        let message = builder
            .body(body(event))
            .map_err(|e| failed(format!("building the message: {e}")))?;
        // A server that accepts and then says nothing (or a line without end) would hold the
        // delivery, and every sink after it, forever.
        let response = tokio::time::timeout(self.delivery_timeout, self.transport.send(message))
            .await
            .map_err(|_| {
                failed(format!(
                    "SMTP: no complete answer from {} within {:?}",
                    self.server, self.delivery_timeout
                ))
            })?
            .map_err(|e| failed(format!("SMTP: {e}")))?;
        Ok(Delivered {
            attempts: 1,
            answer: format!(
                "{} {}",
                response.code(),
                response.message().collect::<Vec<_>>().join(" ")
            ),
        })
    }
}

/// `[Strata] <kind>: <instance>`, the instance id reduced to printable
/// characters and at most 64 of them.
pub(crate) fn subject(event: &Event) -> String {
    let mut s = format!("[Strata] {}", event.kind);
    if let Some(instance) = &event.instance {
        let clean: String = instance
            .chars()
            .filter(|c| !c.is_control())
            .take(64)
            .collect();
        s.push_str(": ");
        s.push_str(&clean);
    }
    s
}

/// The text body: the message, then every field.
pub(crate) fn body(event: &Event) -> String {
    let details = serde_json::to_string_pretty(&event.details).unwrap_or_else(|_| "{}".to_string());
    format!(
        "{}\n\nevent: {}\ninstance: {}\ntime: {}\ndetails: {}\n",
        event.message,
        event.kind,
        event.instance.as_deref().unwrap_or("-"),
        event.time.to_rfc3339(),
        details
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::EventKind;

    #[test]
    fn subjects_carry_no_line_breaks() {
        let e = Event::new(
            EventKind::BackupFailed,
            Some("db\r\nBcc: victim@example.com"),
            chrono::Utc::now(),
            "x\r\nSubject: forged",
        );
        let s = subject(&e);
        assert_eq!(s, "[Strata] backup-failed: dbBcc: victim@example.com");
        assert!(!s.contains('\n') && !s.contains('\r'));
        assert!(body(&e).contains("instance: db\r\nBcc"));
    }

    #[test]
    fn targets_name_the_server_and_recipients_but_no_credentials() {
        let sink = EmailSink::new(EmailSpec {
            name: "mail".into(),
            host: "smtp.example.com".into(),
            port: 587,
            security: SmtpSecurity::None,
            credentials: Some(("strata".into(), "hunter2".into())),
            from: "s@example.com".into(),
            to: vec!["a@example.com".into(), "B <b@example.com>".into()],
            route: Route::default(),
            timeout: std::time::Duration::from_secs(1),
        })
        .unwrap();
        assert_eq!(
            sink.target(),
            "smtp.example.com:587 to a@example.com, b@example.com"
        );
        assert!(!format!("{sink:?}").contains("hunter2"));
    }

    /// A server that accepts the connection and never answers fails the delivery within its
    /// limit instead of holding it.
    #[tokio::test]
    async fn a_silent_server_fails_the_delivery_in_time() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        });
        let sink = EmailSink::new(EmailSpec {
            name: "mail".into(),
            host: "127.0.0.1".into(),
            port,
            security: SmtpSecurity::None,
            credentials: None,
            from: "strata@example.com".into(),
            to: vec!["ops@example.com".into()],
            route: Route::default(),
            timeout: Duration::from_millis(200),
        })
        .unwrap();
        let event = Event::new(
            EventKind::BackupFailed,
            Some("db"),
            chrono::Utc::now(),
            "failed",
        );
        let err = tokio::time::timeout(Duration::from_secs(20), sink.deliver(&event))
            .await
            .expect("the delivery ends")
            .unwrap_err();
        assert!(err.to_string().contains("no complete answer"), "{err}");
    }

    #[test]
    fn addresses_are_checked() {
        let spec = EmailSpec {
            name: "mail".into(),
            host: "127.0.0.1".into(),
            port: 25,
            security: SmtpSecurity::None,
            credentials: None,
            from: "strata@example.com".into(),
            to: vec!["ops@example.com".into()],
            route: Route::default(),
            timeout: Duration::from_secs(5),
        };
        assert!(EmailSink::new(spec.clone()).is_ok());
        let mut bad = spec.clone();
        bad.to = vec!["ops@example.com\r\nBcc: x@example.com".into()];
        assert!(EmailSink::new(bad).is_err());
        let mut none = spec;
        none.to.clear();
        assert!(EmailSink::new(none).is_err());
    }
}
