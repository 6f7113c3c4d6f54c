//! Pipelined dispatch: a busy worker holds its next attempt so that its GPU
//! starts it the moment the current one ends, without waiting for the result to
//! reach the broker and an assignment to come back.
//!
//! A held job is still `queued` (its `worker` names the holder) and keeps every
//! guarantee of a queued one: it can be cancelled or time out (the worker is told
//! to drop it), a more urgent job takes its place while it has not started, an
//! idle worker takes it over rather than wait behind a busy one, and it goes back
//! in line (keeping its place and its attempts) when its worker is lost. Attempt
//! numbers are given at assignment, so a late message about a revoked hold is
//! fenced off like any stale attempt. Holding does not use up an attempt; only
//! starting does.

use std::borrow::Cow;
use std::cmp::Reverse;

use kiln_protocol::worker::{BrokerMessage, JobRef};
use kiln_protocol::{JobId, JobState};

use super::queue::ClassId;
use super::registry::WorkerIdx;
use super::{Core, Output};

impl Core {
    /// Records that worker `idx` holds attempt `r` (already sent to it).
    pub(super) fn hold(&mut self, now_ms: u64, r: JobRef, idx: WorkerIdx, out: &mut Vec<Output>) {
        let w = self.workers.get_mut(idx);
        w.held.push((r, now_ms));
        let note = format!("held by {}: starts when its current job ends", w.id);
        self.workers.refresh_idle(idx);
        let job = self.jobs.get_mut(&r.job_id).expect("held job exists");
        job.held = true;
        // A held job still counts as queued for its client's limit.
        let client = job.client.clone();
        *self.held_priorities.entry(job.spec.priority).or_insert(0) += 1;
        *self.queued_per_client.entry(client).or_insert(0) += 1;
        self.note(now_ms, r.job_id, note, out);
    }

    /// The worker's current attempt ended: the attempt it held first has started
    /// on it already.
    pub(super) fn start_held(&mut self, now_ms: u64, idx: WorkerIdx, out: &mut Vec<Output>) {
        let w = self.workers.get_mut(idx);
        if w.current.is_some() || w.held.is_empty() {
            return;
        }
        let (r, _) = w.held.remove(0);
        w.current = Some(r);
        let job = self.jobs.get_mut(&r.job_id).expect("held job exists");
        debug_assert!(job.held && job.attempt == r.attempt && job.state == JobState::Queued);
        let (priority, client) = (job.spec.priority, job.client.clone());
        self.forget_held_priority(priority);
        self.decrement_queued(&client);
        self.begin_attempt(now_ms, r.job_id, out);
    }

    /// Records a step of a held job in its history and publishes it (its state
    /// stays `queued`).
    fn note(&mut self, now_ms: u64, id: JobId, note: String, out: &mut Vec<Output>) {
        let Some(job) = self.jobs.get_mut(&id) else {
            return;
        };
        let note: Cow<'static, str> = Cow::Owned(note);
        job.record(now_ms, note.clone());
        self.publish_job(now_ms, id, note, out);
    }

    fn forget_held_priority(&mut self, priority: i8) {
        if let Some(n) = self.held_priorities.get_mut(&priority) {
            *n -= 1;
            if *n == 0 {
                self.held_priorities.remove(&priority);
            }
        }
    }

    /// Takes a held job back from its worker (told to drop it when `tell` is set
    /// and it is connected). Returns the worker, or `None` if the job was not held.
    /// The job is left queued but out of line: the caller ends it or enqueues it.
    pub(super) fn unhold(
        &mut self,
        id: JobId,
        tell: bool,
        out: &mut Vec<Output>,
    ) -> Option<WorkerIdx> {
        let job = self.jobs.get_mut(&id)?;
        if !job.held {
            return None;
        }
        job.held = false;
        let r = JobRef {
            job_id: id,
            attempt: job.attempt,
        };
        let holder = job.worker.take();
        job.gpu = None;
        let (priority, client) = (job.spec.priority, job.client.clone());
        self.forget_held_priority(priority);
        self.decrement_queued(&client);
        let idx = holder.as_deref().and_then(|w| self.workers.by_id(w))?;
        let w = self.workers.get_mut(idx);
        w.held.retain(|(h, _)| *h != r);
        if let (true, Some(peer)) = (tell, w.peer.clone()) {
            out.push(Output::ToWorker {
                peer,
                msg: BrokerMessage::Cancel(r),
            });
        }
        self.workers.refresh_idle(idx);
        Some(idx)
    }

    /// Takes a held job back and puts it in line again (it keeps its place).
    pub(super) fn requeue_held(
        &mut self,
        now_ms: u64,
        id: JobId,
        tell: bool,
        why: String,
        out: &mut Vec<Output>,
    ) {
        let attempt = self.jobs.get(&id).map_or(0, |j| j.attempt);
        if self.unhold(id, tell, out).is_none() {
            return;
        }
        self.note(
            now_ms,
            id,
            format!("held attempt {attempt} requeued: {why}"),
            out,
        );
        self.enqueue(now_ms, id, out);
    }

    /// Every job worker `idx` holds goes back in line (the worker was lost, or
    /// no longer names them).
    pub(super) fn requeue_all_held(
        &mut self,
        now_ms: u64,
        idx: WorkerIdx,
        why: &str,
        out: &mut Vec<Output>,
    ) {
        let held: Vec<JobRef> = self.workers.get(idx).held.iter().map(|(r, _)| *r).collect();
        for r in held {
            self.requeue_held(now_ms, r.job_id, false, why.to_string(), out);
        }
    }

    /// A job found no free worker: if some capable worker holds a less urgent job
    /// that has not started, that job goes back in line and this one takes its
    /// place. Returns whether it did.
    pub(super) fn preempt_held(
        &mut self,
        now_ms: u64,
        id: JobId,
        class: ClassId,
        out: &mut Vec<Output>,
    ) -> bool {
        let priority = self.jobs[&id].spec.priority;
        let less_urgent_held = self
            .held_priorities
            .first_key_value()
            .is_some_and(|(p, _)| *p < priority);
        if !less_urgent_held {
            return false;
        }
        let backend = self.queue.requirements(class).backend;
        let mut victim: Option<(i8, JobId, WorkerIdx)> = None;
        for idx in self.workers.indices() {
            let req = self.queue.requirements(class);
            let w = self.workers.get_mut(idx);
            let capable = w.online
                && w.peer.is_some()
                && w.can_run_class(class, req)
                && w.backend_healthy(backend)
                && w.accepts(&self.jobs[&id].spec);
            if !capable {
                continue;
            }
            let w = self.workers.get(idx);
            for (r, _) in w.held.iter().filter(|(r, _)| w.holds_unstarted(*r)) {
                let p = self.jobs[&r.job_id].spec.priority;
                if p < priority && victim.is_none_or(|(vp, _, _)| p < vp) {
                    victim = Some((p, r.job_id, idx));
                }
            }
        }
        let Some((_, held_id, idx)) = victim else {
            return false;
        };
        let holder = self.workers.get(idx).id.clone();
        let attempt = self.jobs[&held_id].attempt;
        self.unhold(held_id, true, out);
        self.assign(now_ms, id, idx, out);
        let why = format!(
            "held attempt {attempt} requeued: a more urgent job took its place on {holder}"
        );
        self.note(now_ms, held_id, why, out);
        self.enqueue(now_ms, held_id, out);
        true
    }

    /// An idle worker found nothing in the queue: rather than stay idle while a
    /// busy worker holds a job it could run, it takes that job over (one whose
    /// model it has warm first; one it would have to load only when the load
    /// pays against what the holder still has to run, see
    /// [`Core::load_pays`]).
    pub(super) fn steal_held(&mut self, now_ms: u64, idx: WorkerIdx, out: &mut Vec<Output>) {
        self.steal_held_above(now_ms, idx, None, out);
    }

    /// [`Core::steal_held`] among the held jobs more urgent than `above` (all
    /// when `None`); returns whether the worker took one. A busy worker with
    /// room to hold takes one over only from a holder expected to be busy
    /// longer ([`Core::busy_for_ms`]).
    pub(super) fn steal_held_above(
        &mut self,
        now_ms: u64,
        idx: WorkerIdx,
        above: Option<i8>,
        out: &mut Vec<Output>,
    ) -> bool {
        if self.held_priorities.is_empty() {
            return false;
        }
        let mut best: Option<(bool, i8, Reverse<JobId>)> = None;
        let candidates: Vec<(JobRef, WorkerIdx)> = self
            .workers
            .iter()
            .filter(|(other, _)| *other != idx)
            .flat_map(|(holder, w)| {
                w.held
                    .iter()
                    .filter(|(r, _)| w.holds_unstarted(*r))
                    .map(move |(r, _)| (*r, holder))
            })
            .collect();
        // Load thresholds per model, computed once (see `Core::load_threshold_ms`).
        let mut thresholds: Vec<(String, f64)> = Vec::new();
        // A busy worker (holding the job for later) takes it over only from a
        // holder expected to be busy longer than itself.
        let free_in = self.busy_for_ms(now_ms, idx);
        for (r, holder) in candidates {
            let job = &self.jobs[&r.job_id];
            let (class, priority) = (job.class, job.spec.priority);
            if above.is_some_and(|a| priority <= a) {
                continue;
            }
            let model = job.spec.model.as_deref();
            let warm = model.is_none_or(|m| self.workers.get(idx).is_warm(m));
            // Warm first, then most urgent, then the oldest job; the cheap
            // comparison first, the costlier checks only for a better one.
            let key = (warm, priority, Reverse(r.job_id));
            if best.is_some_and(|b| key <= b) {
                continue;
            }
            let req = self.queue.requirements(class);
            let backend = req.backend;
            let w = self.workers.get_mut(idx);
            if !w.can_run_class(class, req)
                || !w.backend_healthy(backend)
                || !w.accepts(&self.jobs[&r.job_id].spec)
            {
                continue;
            }
            let gain = |core: &Self| core.busy_for_ms(now_ms, holder) - free_in;
            if free_in > 0.0 && gain(self) <= 0.0 {
                continue;
            }
            if !warm {
                let model = model.unwrap_or_default();
                let threshold = match thresholds.iter().find(|(m, _)| m == model) {
                    Some((_, t)) => *t,
                    None => {
                        let t = self.load_threshold_ms(Some(model), 0);
                        thresholds.push((model.to_string(), t));
                        t
                    }
                };
                // It pays when the job would start sooner here by more than
                // the threshold (always when the threshold is negative).
                if threshold >= 0.0 && gain(self) <= threshold {
                    continue;
                }
            }
            best = Some(key);
        }
        let Some((_, _, Reverse(id))) = best else {
            return false;
        };
        let attempt = self.jobs[&id].attempt;
        let holder = self.unhold(id, true, out);
        let from = holder
            .map(|h| self.workers.get(h).id.to_string())
            .unwrap_or_default();
        let to = self.workers.get(idx).id.clone();
        let why =
            format!("held attempt {attempt} requeued: {to} was idle and took it over from {from}");
        self.note(now_ms, id, why, out);
        self.assign(now_ms, id, idx, out);
        true
    }
}
