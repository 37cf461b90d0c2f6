//! `[notify]`: when the service announces trouble and the sinks it tells
//! (`[[notify.webhook]]`, `[[notify.email]]`), turned into the service's
//! `NotifySettings`. Secrets come from files, never from the TOML itself.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use strata_notify::{
    EmailSink, EmailSpec, EventKind, Notifier, Route, Sink, SmtpSecurity, WebhookSink, WebhookSpec,
};

/// Attempts after the first one a webhook gets by default.
pub const WEBHOOK_RETRIES: u32 = 3;
/// Seconds one webhook attempt or SMTP exchange may take by default.
pub const SINK_TIMEOUT_SECS: u64 = 10;
/// Minutes a WAL receiver fails before it is announced, by default.
pub const WAL_FAILING_MINUTES: u64 = 5;
/// MiB a WAL receiver may stay behind its server, by default (as the
/// `StrataWalLagHigh` rule of deploy/prometheus).
pub const WAL_LAG_MB: u64 = 256;
/// How an SMTP connection is protected unless `security` says otherwise.
pub const SMTP_SECURITY: &str = "starttls-required";
/// The wait before a webhook's first retry (doubling after each).
const WEBHOOK_BACKOFF: Duration = Duration::from_secs(1);

/// `[notify]`.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct NotifyConfig {
    /// Announce an instance without a successful backup for this many hours.
    pub backup_overdue_hours: Option<u32>,
    /// Announce a WAL receiver failing for longer than this.
    pub wal_failing_minutes: Option<u64>,
    /// Announce a WAL receiver further behind its server than this many MiB
    /// for longer than `wal_failing_minutes` (0: never).
    pub wal_lag_mb: Option<u64>,
    /// Announce a recovery window shorter than the log retention promises
    /// by more than this many hours.
    pub recovery_window_short_hours: Option<u32>,
    pub webhook: Vec<WebhookConfig>,
    pub email: Vec<EmailConfig>,
}

/// `[[notify.webhook]]`.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct WebhookConfig {
    pub name: String,
    /// `http://` or `https://`.
    pub url: String,
    /// File holding the HMAC secret (surrounding whitespace ignored).
    pub secret_file: Option<PathBuf>,
    /// Instances whose events it receives (empty: all).
    pub instances: Vec<String>,
    /// Event kinds it receives (empty: all).
    pub events: Vec<String>,
    pub retries: Option<u32>,
    pub timeout_secs: Option<u64>,
}

/// `[[notify.email]]`.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct EmailConfig {
    pub name: String,
    pub host: String,
    pub port: Option<u16>,
    /// `none`, `starttls`, `starttls-required` or `tls`.
    pub security: Option<String>,
    pub user: Option<String>,
    /// File holding the SMTP password.
    pub password_file: Option<PathBuf>,
    pub from: String,
    pub to: Vec<String>,
    pub instances: Vec<String>,
    pub events: Vec<String>,
    pub timeout_secs: Option<u64>,
}

/// A secret read from `path` for `what`, trimmed, not empty.
fn read_secret(path: &PathBuf, what: &str) -> Result<String> {
    let s = std::fs::read_to_string(path)
        .with_context(|| format!("{what} {}", path.display()))?
        .trim()
        .to_string();
    if s.is_empty() {
        bail!("{what} {} is empty", path.display());
    }
    Ok(s)
}

fn route(sink: &str, instances: &[String], events: &[String]) -> Result<Route> {
    let events = events
        .iter()
        .map(|e| e.parse::<EventKind>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("notification sink {sink}: {e}"))?;
    Ok(Route {
        instances: instances.to_vec(),
        events,
    })
}

impl NotifyConfig {
    /// The WAL threshold in force.
    pub fn wal_failing_after(&self) -> Duration {
        Duration::from_secs(60 * self.wal_failing_minutes.unwrap_or(WAL_FAILING_MINUTES))
    }

    /// The WAL lag threshold in force (`None`: off).
    pub fn wal_lag_bytes(&self) -> Option<u64> {
        match self.wal_lag_mb.unwrap_or(WAL_LAG_MB) {
            0 => None,
            mb => Some(mb.saturating_mul(1024 * 1024)),
        }
    }

    /// The sinks, their secrets read and their settings checked.
    pub fn notifier(&self) -> Result<Notifier> {
        let mut sinks = Vec::new();
        for w in &self.webhook {
            let what = format!("[[notify.webhook]] {} secret_file", w.name);
            let Some(path) = &w.secret_file else {
                bail!("[[notify.webhook]] {}: secret_file is required (the HMAC key receivers verify)", w.name);
            };
            let secret = read_secret(path, &what)?;
            sinks.push(Sink::Webhook(WebhookSink::new(WebhookSpec {
                name: w.name.clone(),
                url: w.url.clone(),
                secret: secret.into_bytes(),
                route: route(&w.name, &w.instances, &w.events)?,
                retries: w.retries.unwrap_or(WEBHOOK_RETRIES),
                backoff: WEBHOOK_BACKOFF,
                timeout: Duration::from_secs(w.timeout_secs.unwrap_or(SINK_TIMEOUT_SECS).max(1)),
            })?));
        }
        for e in &self.email {
            let security: SmtpSecurity = e
                .security
                .as_deref()
                .unwrap_or(SMTP_SECURITY)
                .parse()
                .map_err(|m| anyhow::anyhow!("[[notify.email]] {}: {m}", e.name))?;
            let port = e.port.unwrap_or(match security {
                SmtpSecurity::Tls => 465,
                SmtpSecurity::None => 25,
                _ => 587,
            });
            let credentials = match (&e.user, &e.password_file) {
                (Some(u), Some(p)) => Some((
                    u.clone(),
                    read_secret(p, &format!("[[notify.email]] {} password_file", e.name))?,
                )),
                (None, None) => None,
                _ => bail!(
                    "[[notify.email]] {}: user and password_file go together",
                    e.name
                ),
            };
            sinks.push(Sink::Email(EmailSink::new(EmailSpec {
                name: e.name.clone(),
                host: e.host.clone(),
                port,
                security,
                credentials,
                from: e.from.clone(),
                to: e.to.clone(),
                route: route(&e.name, &e.instances, &e.events)?,
                timeout: Duration::from_secs(e.timeout_secs.unwrap_or(SINK_TIMEOUT_SECS).max(1)),
            })?));
        }
        Ok(Notifier::new(sinks)?)
    }

    /// The service's notification settings.
    pub fn settings(&self) -> Result<strata_service::NotifySettings> {
        Ok(strata_service::NotifySettings {
            notifier: self.notifier()?,
            backup_overdue: self
                .backup_overdue_hours
                .filter(|h| *h > 0)
                .map(|h| chrono::Duration::hours(h.into())),
            wal_failing_after: self.wal_failing_after(),
            wal_lag_bytes: self.wal_lag_bytes(),
            window_short_by: self
                .recovery_window_short_hours
                .filter(|h| *h > 0)
                .map(|h| chrono::Duration::hours(h.into())),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml: &str) -> NotifyConfig {
        toml::from_str::<crate::config::Config>(toml)
            .unwrap()
            .notify
    }

    #[test]
    fn sinks_are_read_with_their_secrets_and_routes() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("hook.secret");
        std::fs::write(&secret, "  s3cret\n").unwrap();
        let pw = dir.path().join("smtp.pw");
        std::fs::write(&pw, "pw\n").unwrap();
        let c = parse(&format!(
            r#"
            [notify]
            backup_overdue_hours = 26
            recovery_window_short_hours = 6
            [[notify.webhook]]
            name = "ops"
            url = "https://hooks.example.com/strata"
            secret_file = "{}"
            instances = ["db1"]
            events = ["backup-failed", "drill-failed"]
            [[notify.email]]
            name = "dba"
            host = "smtp.example.com"
            user = "strata"
            password_file = "{}"
            from = "strata@example.com"
            to = ["dba@example.com"]
            "#,
            secret.display(),
            pw.display()
        ));
        let s = c.settings().unwrap();
        assert_eq!(s.backup_overdue, Some(chrono::Duration::hours(26)));
        assert_eq!(s.wal_failing_after, Duration::from_secs(300));
        assert_eq!(s.wal_lag_bytes, Some(256 << 20));
        assert_eq!(
            parse("[notify]\nwal_lag_mb = 0\n")
                .settings()
                .unwrap()
                .wal_lag_bytes,
            None,
            "0 turns it off"
        );
        assert_eq!(
            parse("[notify]\nwal_lag_mb = 64\n")
                .settings()
                .unwrap()
                .wal_lag_bytes,
            Some(64 << 20)
        );
        assert_eq!(s.window_short_by, Some(chrono::Duration::hours(6)));
        let names: Vec<(&str, &str)> = s
            .notifier
            .sinks()
            .iter()
            .map(|s| (s.kind(), s.name()))
            .collect();
        assert_eq!(names, [("webhook", "ops"), ("email", "dba")]);
        assert_eq!(
            parse("[notify]\n").settings().unwrap().window_short_by,
            None,
            "off unless set"
        );
    }

    #[test]
    fn bad_sinks_are_refused_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("s");
        std::fs::write(&secret, "k").unwrap();
        let hook = |url: &str, extra: &str| {
            parse(&format!(
                "[[notify.webhook]]\nname = \"w\"\nurl = \"{url}\"\nsecret_file = \"{}\"\n{extra}",
                secret.display()
            ))
            .notifier()
            .map(|_| ())
            .map_err(|e| format!("{e:#}"))
        };
        assert!(hook("http://127.0.0.1:9/x", "").is_ok());
        assert!(hook("file:///etc/passwd", "")
            .unwrap_err()
            .contains("http://"));
        assert!(hook("http://x/", "events = [\"nope\"]")
            .unwrap_err()
            .contains("unknown event"));
        let no_secret = parse("[[notify.webhook]]\nname = \"w\"\nurl = \"http://x/\"\n");
        assert!(format!("{:#}", no_secret.notifier().unwrap_err()).contains("secret_file"));
        let smtp = parse(
            "[[notify.email]]\nname = \"m\"\nhost = \"h\"\nsecurity = \"maybe\"\nfrom = \"a@b.c\"\nto = [\"d@e.f\"]\n",
        );
        assert!(format!("{:#}", smtp.notifier().unwrap_err()).contains("starttls-required"));
    }
}
