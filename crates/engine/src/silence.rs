//! How long a server may send nothing on a stream before Strata asks it to
//! answer, and then gives the connection up, as PostgreSQL's own WAL
//! receiver does with `wal_receiver_timeout`. TCP keepalive only notices a
//! host that is gone; a live server whose sender is stuck (a hung process,
//! a full disk on its side) keeps the connection open and silent forever.

use std::time::{Duration, Instant};

use pg_replication::{ReplicationError, ReplicationStream};
use pg_wal::Lsn;

/// What to do about the time since the server last sent something.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Nothing to do.
    Fine,
    /// Half the timeout has passed: ask the server to answer now (a status
    /// update with the reply flag set; a live walsender answers with a
    /// keepalive at once).
    Ask,
    /// The whole timeout has passed: the connection is given up.
    GiveUp(Duration),
}

/// The silence on one stream.
#[derive(Debug)]
pub(crate) struct Silence {
    /// `None` when the check is off (a timeout of zero).
    timeout: Option<Duration>,
    last: Instant,
    asked: bool,
}

impl Silence {
    /// A stream just opened; a zero `timeout` never gives up.
    pub(crate) fn new(timeout: Duration) -> Self {
        Silence {
            timeout: (!timeout.is_zero()).then_some(timeout),
            last: Instant::now(),
            asked: false,
        }
    }

    /// Something came from the server (or was just handled: time spent on
    /// our side is no silence of the server's).
    pub(crate) fn heard(&mut self) {
        self.last = Instant::now();
        self.asked = false;
    }

    /// The verdict at `now`; [`Verdict::Ask`] once per silence.
    pub(crate) fn check(&mut self, now: Instant) -> Verdict {
        let Some(timeout) = self.timeout else {
            return Verdict::Fine;
        };
        let quiet = now.saturating_duration_since(self.last);
        if quiet >= timeout {
            Verdict::GiveUp(quiet)
        } else if quiet >= timeout / 2 && !self.asked {
            self.asked = true;
            Verdict::Ask
        } else {
            Verdict::Fine
        }
    }

    /// When the next verdict other than [`Verdict::Fine`] is due: wait for
    /// the server's next message until then (a message that is ready wins
    /// over the deadline), then [`Silence::check`]. A day from now when the
    /// check is off (never passed for long: a deadline in the past would
    /// fire at once, again and again).
    pub(crate) fn deadline(&self) -> tokio::time::Instant {
        let due = match self.timeout {
            None => None,
            Some(t) if self.asked => self.last.checked_add(t),
            Some(t) => self.last.checked_add(t / 2),
        };
        let due = due.unwrap_or_else(|| Instant::now() + Duration::from_secs(86_400));
        tokio::time::Instant::from_std(due)
    }
}

impl Silence {
    /// What a stream does once [`Silence::deadline`] passed with no
    /// message: asks the server to answer (a status update with the reply
    /// flag, reporting `written` and `flushed`), or, once the whole timeout
    /// passed, answers how long the server has been silent: the stream is
    /// to be given up.
    pub(crate) async fn at_deadline(
        &mut self,
        stream: &mut ReplicationStream<'_>,
        written: Lsn,
        flushed: Lsn,
    ) -> Result<Option<Duration>, ReplicationError> {
        match self.check(Instant::now()) {
            Verdict::Fine => Ok(None),
            Verdict::Ask => {
                stream
                    .send_status(written, flushed, Lsn::INVALID, true)
                    .await?;
                Ok(None)
            }
            Verdict::GiveUp(quiet) => Ok(Some(quiet)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn asks_once_at_half_and_gives_up_at_the_timeout() {
        let mut s = Silence::new(Duration::from_secs(60));
        let t0 = s.last;
        assert_eq!(s.check(t0 + Duration::from_secs(29)), Verdict::Fine);
        assert_eq!(s.check(t0 + Duration::from_secs(30)), Verdict::Ask);
        assert_eq!(s.check(t0 + Duration::from_secs(45)), Verdict::Fine);
        assert_eq!(
            s.check(t0 + Duration::from_secs(61)),
            Verdict::GiveUp(Duration::from_secs(61))
        );
        // Asked: the next deadline is the timeout's end.
        assert_eq!(s.deadline().into_std(), t0 + Duration::from_secs(60));
    }

    #[test]
    fn hearing_from_the_server_starts_the_silence_again() {
        let mut s = Silence::new(Duration::from_secs(10));
        let t0 = s.last;
        assert_eq!(s.deadline().into_std(), t0 + Duration::from_secs(5));
        assert_eq!(s.check(t0 + Duration::from_secs(6)), Verdict::Ask);
        s.heard();
        let t1 = s.last;
        assert_eq!(s.check(t1 + Duration::from_secs(9)), Verdict::Ask);
        assert!(matches!(
            s.check(t1 + Duration::from_secs(10)),
            Verdict::GiveUp(_)
        ));
        // A clock reading from before the last message is no silence.
        assert_eq!(s.check(t0), Verdict::Fine);
    }

    #[test]
    fn a_zero_timeout_never_gives_up() {
        let mut s = Silence::new(Duration::ZERO);
        let far = s.last + Duration::from_secs(86_400 * 365);
        assert_eq!(s.check(far), Verdict::Fine);
        // Long after the last message, the deadline is still ahead.
        if let Some(long_ago) = Instant::now().checked_sub(Duration::from_secs(2 * 86_400)) {
            s.last = long_ago;
        }
        assert!(s.deadline().into_std() >= Instant::now() + Duration::from_secs(3600));
    }
}
