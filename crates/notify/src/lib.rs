//! Strata's notifications: the events the service reports (a failed backup
//! or drill, a WAL receiver failing, no recent backup, storage above the free
//! quota, cross-region copies failing, a recovery window shorter than
//! promised) and the sinks that deliver them:
//! webhooks (a JSON body signed with HMAC-SHA256, retried with backoff) and
//! email over SMTP. Which events become due is the service's business; this
//! crate only shapes and delivers them.
//!
//! Everything an event carries (instance ids, messages) is data: JSON-escaped
//! in webhook bodies, kept out of email headers except a sanitized subject.
#![warn(missing_docs)]

mod email;
mod webhook;

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::Serialize;

pub use email::{EmailSink, EmailSpec, SmtpSecurity};
pub use webhook::{sign, verify, WebhookSink, WebhookSpec, SIGNATURE_HEADER, TIMESTAMP_HEADER};

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(into = "&'static str")]
pub enum EventKind {
    /// A backup job failed.
    BackupFailed,
    /// A restore drill of a backup set failed.
    DrillFailed,
    /// An instance's WAL receiver has failed (or its server has been
    /// unreachable) for longer than the threshold.
    WalReceiverFailing,
    /// A WAL receiver reported failing streams again.
    WalReceiverRecovered,
    /// An instance's WAL receiver has stayed further behind its server
    /// than the threshold for longer than the failing threshold.
    WalReceiverLagging,
    /// A WAL receiver reported lagging is within the threshold again.
    WalReceiverCaughtUp,
    /// No successful backup of an instance within the configured hours.
    BackupOverdue,
    /// An instance's stored backups exceed its free quota.
    StorageOverQuota,
    /// Copies of an instance's backups to another region fail.
    CrossRegionCopyFailing,
    /// An instance's point-in-time recovery window is shorter than its
    /// log retention promises, by more than the configured margin.
    RecoveryWindowShort,
    /// A test event (`strata notify test`).
    Test,
}

impl EventKind {
    /// Every kind, in the order above.
    pub const ALL: [EventKind; 11] = [
        EventKind::BackupFailed,
        EventKind::DrillFailed,
        EventKind::WalReceiverFailing,
        EventKind::WalReceiverRecovered,
        EventKind::WalReceiverLagging,
        EventKind::WalReceiverCaughtUp,
        EventKind::BackupOverdue,
        EventKind::StorageOverQuota,
        EventKind::CrossRegionCopyFailing,
        EventKind::RecoveryWindowShort,
        EventKind::Test,
    ];

    /// The spelling used in bodies, headers and configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::BackupFailed => "backup-failed",
            EventKind::DrillFailed => "drill-failed",
            EventKind::WalReceiverFailing => "wal-receiver-failing",
            EventKind::WalReceiverRecovered => "wal-receiver-recovered",
            EventKind::WalReceiverLagging => "wal-receiver-lagging",
            EventKind::WalReceiverCaughtUp => "wal-receiver-caught-up",
            EventKind::BackupOverdue => "backup-overdue",
            EventKind::StorageOverQuota => "storage-over-quota",
            EventKind::CrossRegionCopyFailing => "cross-region-copy-failing",
            EventKind::RecoveryWindowShort => "recovery-window-short",
            EventKind::Test => "test",
        }
    }
}

impl From<EventKind> for &'static str {
    fn from(k: EventKind) -> Self {
        k.as_str()
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for EventKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        EventKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| {
                let known: Vec<&str> = EventKind::ALL.iter().map(|k| k.as_str()).collect();
                format!("unknown event {s:?} (known: {})", known.join(", "))
            })
    }
}

/// One notification, as every sink receives it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Event {
    /// What happened.
    pub kind: EventKind,
    /// The instance it concerns, if any.
    pub instance: Option<String>,
    /// When it was noticed.
    pub time: DateTime<Utc>,
    /// One sentence for people.
    pub message: String,
    /// Facts for programs (job id, error, figures).
    pub details: serde_json::Value,
}

impl Event {
    /// An event without details.
    pub fn new(
        kind: EventKind,
        instance: Option<&str>,
        time: DateTime<Utc>,
        message: impl Into<String>,
    ) -> Self {
        Event {
            kind,
            instance: instance.map(str::to_string),
            time,
            message: message.into(),
            details: serde_json::Value::Object(Default::default()),
        }
    }

    /// The event with `details`.
    pub fn with_details(mut self, details: serde_json::Value) -> Self {
        self.details = details;
        self
    }

    /// The JSON body a webhook receives.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an event serializes")
    }
}

/// Which events a sink receives: empty lists mean all.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Route {
    /// Instances whose events it receives.
    pub instances: Vec<String>,
    /// Kinds it receives.
    pub events: Vec<EventKind>,
}

impl Route {
    /// Whether `event` passes. Test events pass every route: `strata notify
    /// test` checks the sink, not its filters.
    pub fn wants(&self, event: &Event) -> bool {
        if event.kind == EventKind::Test {
            return true;
        }
        let instance_ok = self.instances.is_empty()
            || event
                .instance
                .as_ref()
                .is_some_and(|i| self.instances.iter().any(|x| x == i));
        let kind_ok = self.events.is_empty() || self.events.contains(&event.kind);
        instance_ok && kind_ok
    }
}

/// Why a sink could not be set up or a delivery failed.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    /// The sink's configuration is unusable.
    #[error("notification sink {sink}: {reason}")]
    Config {
        /// The sink's name.
        sink: String,
        /// What is wrong.
        reason: String,
    },
    /// Every attempt failed.
    #[error("{reason} (after {attempts} attempt(s))")]
    Failed {
        /// Attempts made.
        attempts: u32,
        /// The last failure.
        reason: String,
    },
}

/// A delivery that succeeded.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivered {
    /// Attempts it took.
    pub attempts: u32,
    /// What the far end answered (`HTTP 200`, `250 OK`).
    pub answer: String,
}

/// One place notifications go.
#[derive(Debug)]
pub enum Sink {
    /// A webhook.
    Webhook(WebhookSink),
    /// Email over SMTP.
    Email(EmailSink),
}

impl Sink {
    /// Its name, unique among the sinks.
    pub fn name(&self) -> &str {
        match self {
            Sink::Webhook(w) => w.name(),
            Sink::Email(e) => e.name(),
        }
    }

    /// `webhook` or `email`.
    pub fn kind(&self) -> &'static str {
        match self {
            Sink::Webhook(_) => "webhook",
            Sink::Email(_) => "email",
        }
    }

    /// Which events it receives.
    pub fn route(&self) -> &Route {
        match self {
            Sink::Webhook(w) => w.route(),
            Sink::Email(e) => e.route(),
        }
    }

    /// Where it delivers, for people, without secrets (see
    /// [`WebhookSink::target`], [`EmailSink::target`]).
    pub fn target(&self) -> String {
        match self {
            Sink::Webhook(w) => w.target(),
            Sink::Email(e) => e.target(),
        }
    }

    /// Whether it receives `event`.
    pub fn wants(&self, event: &Event) -> bool {
        self.route().wants(event)
    }

    /// A `test` event (which every route lets through), as `strata notify
    /// test` and the console's "Send test" send; `origin` says which.
    pub fn test_event(origin: &str) -> Event {
        Event::new(
            EventKind::Test,
            None,
            Utc::now(),
            format!("a test notification from {origin}"),
        )
    }

    /// Delivers `event`, retrying as the sink allows.
    pub async fn deliver(&self, event: &Event) -> Result<Delivered, NotifyError> {
        match self {
            Sink::Webhook(w) => w.deliver(event).await,
            Sink::Email(e) => e.deliver(event).await,
        }
    }
}

/// The configured sinks (none: notifications are off).
#[derive(Debug, Clone, Default)]
pub struct Notifier {
    sinks: Arc<Vec<Sink>>,
}

impl Notifier {
    /// A notifier over `sinks`; refused when two share a name.
    pub fn new(sinks: Vec<Sink>) -> Result<Self, NotifyError> {
        for (i, s) in sinks.iter().enumerate() {
            if sinks[..i].iter().any(|o| o.name() == s.name()) {
                return Err(NotifyError::Config {
                    sink: s.name().to_string(),
                    reason: "two sinks share this name".into(),
                });
            }
        }
        Ok(Notifier {
            sinks: Arc::new(sinks),
        })
    }

    /// Whether any sink is configured.
    pub fn is_empty(&self) -> bool {
        self.sinks.is_empty()
    }

    /// The sinks, in configuration order.
    pub fn sinks(&self) -> &[Sink] {
        &self.sinks
    }

    /// The sinks that receive `event`.
    pub fn sinks_for<'a>(&'a self, event: &'a Event) -> impl Iterator<Item = &'a Sink> + 'a {
        self.sinks.iter().filter(move |s| s.wants(event))
    }
}

/// A sink's name must be short and printable: it reaches logs and job
/// records.
pub(crate) fn check_name(name: &str) -> Result<(), NotifyError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if ok {
        Ok(())
    } else {
        Err(NotifyError::Config {
            sink: name.escape_debug().to_string(),
            reason: "a sink name is 1 to 64 letters, digits, '-', '_' or '.'".into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: EventKind, instance: Option<&str>) -> Event {
        Event::new(kind, instance, Utc::now(), "m")
    }

    #[test]
    fn routes_filter_by_instance_and_kind() {
        let r = Route {
            instances: vec!["a".into()],
            events: vec![EventKind::BackupFailed],
        };
        assert!(r.wants(&event(EventKind::BackupFailed, Some("a"))));
        assert!(!r.wants(&event(EventKind::BackupFailed, Some("b"))));
        assert!(!r.wants(&event(EventKind::BackupFailed, None)));
        assert!(!r.wants(&event(EventKind::DrillFailed, Some("a"))));
        assert!(r.wants(&event(EventKind::Test, None)));
        assert!(Route::default().wants(&event(EventKind::DrillFailed, None)));
    }

    #[test]
    fn kinds_round_trip_and_unknown_ones_are_refused() {
        for k in EventKind::ALL {
            assert_eq!(k.as_str().parse::<EventKind>().unwrap(), k);
        }
        let err = "backup-failing".parse::<EventKind>().unwrap_err();
        assert!(err.contains("backup-failed"), "{err}");
    }

    #[test]
    fn instance_ids_in_bodies_are_json_data() {
        let e = event(EventKind::BackupFailed, Some("a\"}, \"x\": \"\n"));
        let back: serde_json::Value = serde_json::from_slice(&e.to_json()).unwrap();
        assert_eq!(back["instance"], "a\"}, \"x\": \"\n");
        assert_eq!(back["kind"], "backup-failed");
        assert!(back.get("x").is_none());
    }

    #[test]
    fn sink_names_are_checked() {
        assert!(check_name("ops-pager_1").is_ok());
        for bad in ["", "a b", "x\ny", &"n".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }
}
