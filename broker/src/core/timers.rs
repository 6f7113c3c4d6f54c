//! Deadlines on jobs: the queue timeout, the run timeout of an attempt, and the
//! grace a worker has to confirm a cancel.

use std::cmp::Reverse;

use kiln_protocol::worker::{BrokerMessage, JobRef};
use kiln_protocol::{FailureKind, JobError, JobId, JobState};

use super::workers::to_worker;
use super::{Core, Output};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum TimerKind {
    QueueTimeout,
    RunTimeout,
    CancelGrace,
}

/// A deadline on one attempt of one job. Timers are never removed: when one fires
/// it checks that its job is still in the situation it was set for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Timer {
    pub(super) at_ms: u64,
    pub(super) kind: TimerKind,
    pub(super) job_id: JobId,
    pub(super) attempt: u32,
}

impl Core {
    pub(super) fn add_timer(&mut self, at_ms: u64, kind: TimerKind, job_id: JobId, attempt: u32) {
        self.timers.push(Reverse(Timer {
            at_ms,
            kind,
            job_id,
            attempt,
        }));
    }
}

impl Core {
    pub(super) fn on_timer(&mut self, now_ms: u64, t: Timer, out: &mut Vec<Output>) {
        let Some(job) = self.jobs.get(&t.job_id) else {
            return;
        };
        match t.kind {
            TimerKind::QueueTimeout => {
                if job.state == JobState::Queued && job.queue_deadline_ms == Some(t.at_ms) {
                    let err = JobError::new(
                        FailureKind::QueueTimeout,
                        format!(
                            "waited {} s in the queue without a free capable worker",
                            (now_ms - job.created_ms) / 1000
                        ),
                        false,
                    );
                    self.end_queued(now_ms, t.job_id, JobState::Failed, Some(err), out);
                }
            }
            TimerKind::RunTimeout => {
                if job.state == JobState::Running
                    && job.attempt == t.attempt
                    && job.run_deadline_ms == Some(t.at_ms)
                {
                    let secs = job
                        .spec
                        .run_timeout_s
                        .unwrap_or(self.cfg.default_run_timeout_s);
                    self.stop_on_worker(t.job_id, t.attempt, out);
                    let err = JobError::new(
                        FailureKind::RunTimeout,
                        format!(
                            "attempt {} ran longer than its {secs} s run timeout",
                            t.attempt
                        ),
                        false,
                    );
                    self.end_attempt(now_ms, t.job_id, err, out);
                }
            }
            TimerKind::CancelGrace => {
                if job.state == JobState::Running
                    && job.attempt == t.attempt
                    && job.cancel_requested
                {
                    tracing::warn!(job = %t.job_id, "worker did not confirm the cancel in time; recording it as cancelled");
                    let err = JobError::new(FailureKind::Backend, "cancel not confirmed", false);
                    self.end_attempt(now_ms, t.job_id, err, out);
                }
            }
        }
    }

    /// Asks the worker running an attempt to stop it. The worker stays busy until
    /// it reports the attempt's end.
    pub(super) fn stop_on_worker(&self, id: JobId, attempt: u32, out: &mut Vec<Output>) {
        let peer = self
            .jobs
            .get(&id)
            .and_then(|j| j.worker.as_deref())
            .and_then(|w| self.workers.by_id(w))
            .and_then(|idx| self.workers.get(idx).peer.clone());
        if let Some(peer) = peer {
            to_worker(
                out,
                peer,
                BrokerMessage::Cancel(JobRef {
                    job_id: id,
                    attempt,
                }),
            );
        }
    }
}
