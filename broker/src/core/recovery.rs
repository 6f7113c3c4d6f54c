//! Rebuilding the broker's state from its store after a restart.

use kiln_protocol::worker::JobRef;
use kiln_protocol::{FailureKind, JobError, JobState};

use super::job::Job;
use super::registry::{FleetRecord, Worker};
use super::timers::TimerKind;
use super::{Core, Output};

/// How long after a broker restart a worker that held a job may take to
/// re-register before the job runs elsewhere: the worker's reconnect backoff caps
/// at 32 s and each connect waits up to 5 s (see `kiln_worker::runner`), plus slack.
pub const REREGISTER_GRACE_MS: u64 = 40_000;

impl Core {
    /// Rebuilds the broker from its store after a restart.
    ///
    /// `boot` counts broker starts; this boot's sequence numbers start above
    /// `boot << 32` so followers never mistake a new event for an old one, and a
    /// job's next attempt is numbered above its stored reservation (attempt
    /// numbers jump after a restart; `max_attempts` counts tries, not numbers). Queued
    /// jobs go back in line in their original order. A job that was running stays
    /// assigned to its worker for one liveness window: if the worker re-registers
    /// still running it (or holding its result) the attempt goes on; otherwise the
    /// attempt counts as lost and the job is requeued or failed by the usual rules.
    /// The shell should persist the records in `out` (such requeues) and may drop
    /// the rest.
    pub fn recover(
        &mut self,
        now_ms: u64,
        boot: u64,
        mut jobs: Vec<Job>,
        fleet: Vec<FleetRecord>,
        next_job_id: u64,
        out: &mut Vec<Output>,
    ) {
        self.seq_floor = boot << 32;
        for record in fleet {
            let mut w = Worker::from_record(record);
            w.last_seen_ms = now_ms;
            self.workers.insert(w);
        }
        jobs.sort_by_key(|j| (j.enqueue_seq, j.id));
        // A worker that lost the broker retries with backoff up to 32 s, each
        // try waiting up to 5 s to connect: give it that long to come back with
        // its job (and perhaps a finished result) before the job runs again.
        let grace = now_ms + (2 * self.cfg.liveness_ms()).max(REREGISTER_GRACE_MS);
        let scratch = out;
        for mut job in jobs {
            if job.state.is_terminal() {
                // Nothing more is published for a finished job: its snapshot keeps
                // the number its last event had.
                self.stats.count_finished(job.state);
            } else {
                // Events after the last stored record may have been published;
                // the job's next ones must be numbered above them.
                job.seq = job.seq.max(self.seq_floor);
            }
            // Assignments may have been sent without being recorded: number the
            // next ones above every number that could have been used.
            job.attempt_floor = job.attempt_reserve.max(job.attempt);
            self.next_job_id = self.next_job_id.max(job.id.0 + 1);
            self.next_enqueue_seq = self.next_enqueue_seq.max(job.enqueue_seq + 1);
            if let Some(key) = &job.spec.idempotency_key {
                self.idempotency
                    .insert((job.client.clone(), key.clone()), job.id);
            }
            self.artifact_bytes += job.artifacts.iter().map(|a| a.size).sum::<u64>();
            let id = job.id;
            let state = job.state;
            let holder = job.worker.as_deref().and_then(|w| self.workers.by_id(w));
            self.jobs.insert(id, Box::new(job));
            match state {
                JobState::Queued => {
                    // A job held by a worker before the restart is simply queued
                    // again; the worker is told to drop it when it re-registers.
                    let job = self.jobs.get_mut(&id).expect("inserted");
                    job.worker = None;
                    job.gpu = None;
                    let job = &self.jobs[&id];
                    if let Some(at) = job.queue_deadline_ms {
                        self.add_timer(at, TimerKind::QueueTimeout, id, 0);
                    }
                    self.enqueue(now_ms, id, scratch);
                }
                JobState::Running => {
                    self.running += 1;
                    let job = self.jobs.get_mut(&id).expect("inserted");
                    let r = JobRef {
                        job_id: id,
                        attempt: job.attempt,
                    };
                    let (run_deadline, cancel_requested) =
                        (job.run_deadline_ms, job.cancel_requested);
                    if let Some(at) = run_deadline {
                        self.add_timer(at, TimerKind::RunTimeout, id, r.attempt);
                    }
                    if cancel_requested {
                        let at = now_ms + self.cfg.cancel_grace_ms;
                        self.add_timer(at, TimerKind::CancelGrace, id, r.attempt);
                    }
                    match holder {
                        Some(idx) if self.workers.get(idx).current.is_none() => {
                            let w = self.workers.get_mut(idx);
                            w.current = Some(r);
                            w.expires_ms = grace;
                        }
                        _ => {
                            let err = JobError::new(
                                FailureKind::WorkerLost,
                                "its worker is unknown after a broker restart",
                                true,
                            );
                            self.end_attempt(now_ms, id, err, scratch);
                        }
                    }
                }
                _ => {}
            }
        }
        self.next_job_id = self.next_job_id.max(next_job_id);
    }
}
