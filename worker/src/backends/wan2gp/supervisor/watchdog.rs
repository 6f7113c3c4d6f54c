//! The clocks a running job is watched by, apart from the job itself so that
//! which alarm fires when can be tested without a bridge.
//!
//! - **heartbeat**: no message at all from the bridge for `heartbeat_timeout`;
//! - **stall**: no progress, status, info or log line for `stall_timeout`;
//! - **cancel**: a cancel sent and no terminal message within `cancel_grace`
//!   (`kill_grace` when the worker is stopping: it does not wait out a model load).

use std::time::Duration;

use tokio::time::Instant;

use super::Settings;

/// The limits, from the supervisor's settings.
#[derive(Debug, Clone, Copy)]
pub(super) struct Watch {
    pub heartbeat_timeout: Duration,
    pub stall_timeout: Duration,
    pub cancel_grace: Duration,
    pub kill_grace: Duration,
}

/// When things last happened in one job.
#[derive(Debug, Clone, Copy)]
pub(super) struct Clocks {
    /// Any message from the bridge.
    pub last_heard: Instant,
    /// Anything about this job.
    pub last_activity: Instant,
    pub cancel_sent: Option<Instant>,
    pub stopping: bool,
}

/// Which limit was passed; checked in this order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Alarm {
    CancelIgnored,
    Wedged,
    Stalled,
}

impl Watch {
    pub fn new(s: &Settings) -> Watch {
        Watch {
            heartbeat_timeout: s.heartbeat_timeout,
            stall_timeout: s.stall_timeout,
            cancel_grace: s.cancel_grace,
            kill_grace: s.kill_grace,
        }
    }

    fn escalate_at(&self, c: &Clocks) -> Option<Instant> {
        let grace = if c.stopping {
            self.kill_grace
        } else {
            self.cancel_grace
        };
        c.cancel_sent.map(|t| t + grace)
    }

    /// The earliest moment an alarm can fire.
    pub fn next(&self, c: &Clocks) -> Instant {
        let wedged = c.last_heard + self.heartbeat_timeout;
        let stalled = c.last_activity + self.stall_timeout;
        let first = wedged.min(stalled);
        self.escalate_at(c).map_or(first, |e| e.min(first))
    }

    /// The alarm due at `now`, if any.
    pub fn alarm(&self, c: &Clocks, now: Instant) -> Option<Alarm> {
        if self.escalate_at(c).is_some_and(|e| now >= e) {
            Some(Alarm::CancelIgnored)
        } else if now >= c.last_heard + self.heartbeat_timeout {
            Some(Alarm::Wedged)
        } else if now >= c.last_activity + self.stall_timeout {
            Some(Alarm::Stalled)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn watch() -> Watch {
        Watch {
            heartbeat_timeout: 30 * S,
            stall_timeout: 900 * S,
            cancel_grace: 90 * S,
            kill_grace: 10 * S,
        }
    }

    #[test]
    fn each_clock_fires_at_its_limit_and_the_cancel_grace_first() {
        let t0 = Instant::now();
        let w = watch();
        let mut c = Clocks {
            last_heard: t0,
            last_activity: t0,
            cancel_sent: None,
            stopping: false,
        };
        assert_eq!(w.next(&c), t0 + 30 * S);
        assert_eq!(w.alarm(&c, t0 + 29 * S), None);
        assert_eq!(w.alarm(&c, t0 + 30 * S), Some(Alarm::Wedged));
        // Heartbeats keep coming but the job says nothing.
        c.last_heard = t0 + 899 * S;
        assert_eq!(w.next(&c), t0 + 900 * S);
        assert_eq!(w.alarm(&c, t0 + 900 * S), Some(Alarm::Stalled));
        // A cancel during a model load: its grace is what fires, and it is
        // checked before the others.
        c.last_heard = t0;
        c.last_activity = t0;
        c.cancel_sent = Some(t0);
        assert_eq!(w.next(&c), t0 + 30 * S, "the heartbeat limit is nearer");
        c.last_heard = t0 + 80 * S;
        assert_eq!(w.next(&c), t0 + 90 * S);
        assert_eq!(w.alarm(&c, t0 + 89 * S), None);
        assert_eq!(w.alarm(&c, t0 + 90 * S), Some(Alarm::CancelIgnored));
        // A stopping worker waits only the kill grace.
        c.stopping = true;
        assert_eq!(w.next(&c), t0 + 10 * S);
        assert_eq!(w.alarm(&c, t0 + 10 * S), Some(Alarm::CancelIgnored));
    }
}
