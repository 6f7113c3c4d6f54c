//! The one place where jobs change state, and the scheduling decisions that cause
//! those changes: enqueue, assign, requeue, finish.

use std::borrow::Cow;

use kiln_protocol::event::{JobStateEvent, WorkerStateEvent};
use kiln_protocol::worker::{Assign, BrokerMessage, JobRef};
use kiln_protocol::{ArtifactMeta, Event, FailureKind, JobError, JobId, JobState};

use super::queue::{Requirements, Slot};
use super::registry::WorkerIdx;
use super::{ArtifactOp, Core, Output, Record, TimerKind};

/// Attempt numbers each stored record reserves (see `Job::attempt_reserve`): far
/// more assignments than can happen between two commits of one job.
const ATTEMPT_RESERVE: u32 = 64;

impl Core {
    /// Moves a job to `state`: updates counters, records the transition in its
    /// history, bumps its sequence number, persists its record and publishes the
    /// change. Callers set the other fields (worker, error, attempt) first.
    pub(super) fn change(
        &mut self,
        now_ms: u64,
        id: JobId,
        state: JobState,
        note: impl Into<Cow<'static, str>>,
        out: &mut Vec<Output>,
    ) {
        let Some(job) = self.jobs.get_mut(&id) else {
            return;
        };
        let old = job.state;
        if old == JobState::Running && state != JobState::Running {
            self.running -= 1;
        } else if old != JobState::Running && state == JobState::Running {
            self.running += 1;
        }
        if state.is_terminal() && !old.is_terminal() {
            job.finished_ms = Some(now_ms);
            self.stats.count_finished(state);
        }
        if old == JobState::Running && state == JobState::Queued {
            self.stats.requeues += 1;
        }
        job.state = state;
        let note = note.into();
        job.record(now_ms, note.clone());
        self.publish_job(now_ms, id, note, out);
    }

    /// Persists and publishes the job's current state without a state change (a
    /// cancel request on a running job).
    pub(super) fn publish_job(
        &mut self,
        now_ms: u64,
        id: JobId,
        note: Cow<'static, str>,
        out: &mut Vec<Output>,
    ) {
        let (persist, named) = (self.cfg.persist, self.cfg.named_records);
        let Some(job) = self.jobs.get_mut(&id) else {
            return;
        };
        job.seq += 1;
        if persist {
            job.attempt_reserve = job.attempt + ATTEMPT_RESERVE;
            out.push(Output::Persist(Record::Job {
                id,
                bytes: if named {
                    job.named_state_record()
                } else {
                    job.state_record()
                },
            }));
        }
        out.push(Output::Publish(Event::JobState(JobStateEvent {
            job_id: id,
            seq: job.seq,
            state: job.state,
            attempt: job.attempt,
            worker: job.worker.clone(),
            error: job.error.clone(),
            artifacts: job.artifacts.clone(),
            cancel_requested: job.cancel_requested,
            note,
            at_ms: now_ms,
        })));
    }

    /// Announces a worker's state when it changed (a worker going from one job
    /// straight to the next stays busy and says nothing).
    pub(super) fn publish_worker(&mut self, now_ms: u64, idx: WorkerIdx, out: &mut Vec<Output>) {
        let w = self.workers.get_mut(idx);
        let state = w.state();
        if w.announced == Some(state) {
            return;
        }
        w.announced = Some(state);
        out.push(Output::Publish(Event::WorkerState(WorkerStateEvent {
            worker_id: w.id.clone(),
            state: w.state(),
            job_id: w.current.map(|r| r.job_id),
            at_ms: now_ms,
        })));
    }

    pub(super) fn requirements(&self, id: JobId) -> Requirements {
        let job = &self.jobs[&id];
        Requirements::of(&job.spec, job.min_vram_mb)
    }

    /// Puts a job (new, recovered or requeued) in line, or straight onto a
    /// worker: the best idle one (see [`Core::placement_key`]), else a busy one with
    /// room to hold it (pipelined dispatch), else in place of a less urgent held
    /// job.
    pub(super) fn enqueue(&mut self, now_ms: u64, id: JobId, out: &mut Vec<Output>) {
        let req = self.requirements(id);
        let class = self.queue.class_of(req);
        self.jobs.get_mut(&id).expect("enqueued job exists").class = class;
        // While the store cannot write, nothing new starts or is held: its outputs
        // could not be kept, and the attempt would be spent on the broker's own fault.
        let mut loader = None;
        // Whether an idle worker that could run the job was left idle because a
        // load would not pay: the job's wait for a warm GPU starts its clock.
        let mut left_idle = false;
        if self.store_fault.is_none() {
            let idle: Vec<WorkerIdx> = self.workers.idle().collect();
            let best = match self.best_worker(now_ms, id, class, idle) {
                (Some(idx), _) => Some(idx),
                (None, declined) => {
                    left_idle = declined;
                    let open: Vec<WorkerIdx> = self.workers.open().collect();
                    self.best_worker(now_ms, id, class, open).0
                }
            };
            if let Some(idx) = best {
                let model = self.jobs[&id].spec.model.as_deref();
                let cold = self.cfg.load_aware
                    && model.is_some_and(|m| {
                        !self.workers.get(idx).is_warm(m) && self.queue.waiting_for_model(m) > 0
                    });
                if !cold {
                    self.assign(now_ms, id, idx, out);
                    return;
                }
                // The worker loads the model for the oldest job of it waiting,
                // in line with the others: this one queues.
                loader = Some(idx);
            }
            if loader.is_none() && self.preempt_held(now_ms, id, class, out) {
                return;
            }
        }
        let job = self.jobs.get_mut(&id).expect("enqueued job exists");
        let slot = Slot {
            priority: job.spec.priority,
            class,
            seq: job.enqueue_seq,
        };
        job.slot = Some(slot);
        let client = job.client.clone();
        self.queue.push(id, &client, slot);
        *self.queued_per_client.entry(client).or_insert(0) += 1;
        if left_idle {
            if let Some(model) = self.jobs[&id].spec.model.as_deref() {
                self.queue.note_left_idle(model, now_ms);
            }
        }
        if let Some(idx) = loader {
            self.dispatch(now_ms, idx, out);
        }
    }

    /// Among `candidates`, the worker that can run job `id` now and ranks best.
    /// One without the job's model warm is a candidate only when loading it there
    /// pays (see [`Core::load_pays`]); the second value says whether such a
    /// worker could run the job but was passed over for that reason.
    pub(super) fn best_worker(
        &mut self,
        now_ms: u64,
        id: JobId,
        class: super::queue::ClassId,
        candidates: Vec<WorkerIdx>,
    ) -> (Option<WorkerIdx>, bool) {
        let backend = self.queue.requirements(class).backend;
        let spec = self.jobs[&id].spec.clone();
        let model = spec.model.as_deref();
        // When a GPU should load the model: the same threshold for every one.
        let threshold = self.load_threshold_ms(model, 1);
        let mut best: Option<(super::placement::Key, WorkerIdx)> = None;
        let mut declined = false;
        for idx in candidates {
            let req = self.queue.requirements(class);
            let w = self.workers.get_mut(idx);
            if !w.can_run_class(class, req) || !w.backend_healthy(backend) || !w.accepts(&spec) {
                continue;
            }
            let key = self.placement_key(id, idx);
            // A load on a busy worker waits for its current attempt too: it
            // pays when `-busy > threshold` (never when the threshold is >= 0).
            if !key.0
                && (threshold >= 0.0
                    || threshold > f64::NEG_INFINITY && -self.busy_for_ms(now_ms, idx) <= threshold)
            {
                declined = true;
                continue;
            }
            if best.as_ref().is_none_or(|(b, _)| key > *b) {
                best = Some((key, idx));
            }
        }
        (best.map(|(_, idx)| idx), declined)
    }

    /// Takes a job out of the queue (cancel, timeout, adoption).
    pub(super) fn unqueue(&mut self, id: JobId) {
        let Some(job) = self.jobs.get_mut(&id) else {
            return;
        };
        if let Some(slot) = job.slot.take() {
            let client = job.client.clone();
            if self.queue.remove(&client, slot) {
                self.decrement_queued(&client);
            }
        }
    }

    pub(super) fn decrement_queued(&mut self, client: &std::sync::Arc<str>) {
        if let Some(n) = self.queued_per_client.get_mut(client) {
            *n -= 1;
            if *n == 0 {
                self.queued_per_client.remove(client);
            }
        }
    }

    /// Sends the next attempt of a job to a worker: it starts at once on an idle
    /// worker, or is held by a busy one that starts it the moment its current job
    /// ends.
    pub(super) fn assign(&mut self, now_ms: u64, id: JobId, idx: WorkerIdx, out: &mut Vec<Output>) {
        let w = self.workers.get(idx);
        let Some(peer) = w.peer.clone() else {
            return;
        };
        let start = w.current.is_none();
        let worker_id = w.id.clone();
        let gpu = w.gpu_label();
        let cold_model = self.jobs[&id]
            .spec
            .model
            .as_deref()
            .filter(|m| !w.is_warm(m))
            .map(str::to_string);
        let job = self.jobs.get_mut(&id).expect("assigned job exists");
        job.attempt = job.attempt.max(job.attempt_floor) + 1;
        job.worker = Some(worker_id.clone());
        job.gpu = Some(gpu);
        job.cold = cold_model.is_some();
        let r = JobRef {
            job_id: id,
            attempt: job.attempt,
        };
        if let Some(model) = cold_model {
            // Warm from now on: counted when the worker is refreshed below.
            self.workers.get_mut(idx).assumed.push((r, model));
        }
        out.push(Output::ToWorker {
            peer,
            msg: BrokerMessage::Assign(Assign {
                job_id: id,
                attempt: r.attempt,
                job: job.spec.clone(),
                degrade: job.degrade,
                hold: !start,
            }),
        });
        if start {
            self.workers.get_mut(idx).current = Some(r);
            self.workers.refresh_idle(idx);
            self.begin_attempt(now_ms, id, out);
            self.publish_worker(now_ms, idx, out);
        } else {
            self.hold(now_ms, r, idx, out);
        }
    }

    /// Marks an assigned attempt as running: on assignment to an idle worker, or
    /// when the attempt its worker held starts.
    pub(super) fn begin_attempt(&mut self, now_ms: u64, id: JobId, out: &mut Vec<Output>) {
        let default_run = self.cfg.default_run_timeout_s;
        let job = self.jobs.get_mut(&id).expect("started job exists");
        job.held = false;
        job.tries += 1;
        job.started_ms = Some(now_ms);
        job.progress = None;
        job.finalizing = false;
        job.uploads.clear();
        job.error = None;
        let run_timeout = job.spec.run_timeout_s.unwrap_or(default_run);
        job.run_deadline_ms = (run_timeout > 0).then(|| now_ms + run_timeout as u64 * 1000);
        let attempt = job.attempt;
        let run_deadline = job.run_deadline_ms;
        // The transition itself records the attempt and the worker.
        self.change(now_ms, id, JobState::Running, "", out);
        if let Some(at) = run_deadline {
            self.add_timer(at, TimerKind::RunTimeout, id, attempt);
        }
    }

    /// Gives a healthy worker the next jobs it can run: one to start if it is idle,
    /// then as many to hold as it has room for. An idle worker with nothing in the
    /// queue takes a job another worker holds.
    pub(super) fn dispatch(&mut self, now_ms: u64, idx: WorkerIdx, out: &mut Vec<Output>) {
        // Priorities are not crossed through holds either: a worker that is
        // free, or will be sooner than the holder, first takes over a held job
        // more urgent than anything queued.
        loop {
            let w = self.workers.get(idx);
            let room = w.current.is_none() || w.can_hold();
            if !(w.ready() && self.store_fault.is_none() && room) {
                break;
            }
            let (Some(&held), Some(queued)) = (
                self.held_priorities.keys().next_back(),
                self.queue.top_priority(),
            ) else {
                break;
            };
            if held <= queued || !self.steal_held_above(now_ms, idx, Some(queued), out) {
                break;
            }
        }
        if self.dispatch_queued(now_ms, idx, out) {
            self.steal_held(now_ms, idx, out);
        }
    }

    /// [`Core::dispatch`] from the queue alone; returns whether the worker is
    /// still idle for want of a queued job it should take.
    pub(super) fn dispatch_queued(
        &mut self,
        now_ms: u64,
        idx: WorkerIdx,
        out: &mut Vec<Output>,
    ) -> bool {
        loop {
            let w = self.workers.get(idx);
            // While the store cannot write, nothing new starts or is held.
            if !w.ready() || self.store_fault.is_some() {
                return false;
            }
            let idle = w.current.is_none();
            if !idle && !w.can_hold() {
                return false;
            }
            let classes = self.queue.class_count();
            let mut runnable = std::mem::take(&mut self.runnable);
            runnable.clear();
            for class in 0..classes as u32 {
                let req = self.queue.requirements(class);
                let backend = req.backend;
                let w = self.workers.get_mut(idx);
                runnable.push(w.can_run_class(class, req) && w.backend_healthy(backend));
            }
            let next = self.pop_for_worker(now_ms, idx, &runnable);
            self.runnable = runnable;
            let Some(id) = next else {
                return idle;
            };
            let job = self.jobs.get_mut(&id).expect("queued job exists");
            job.slot = None;
            let client = job.client.clone();
            self.decrement_queued(&client);
            self.assign(now_ms, id, idx, out);
        }
    }

    /// Frees a worker after its attempt ended: the attempt it held starts (it did
    /// so on the worker already), and it is offered the next job.
    pub(super) fn release_worker(&mut self, now_ms: u64, idx: WorkerIdx, out: &mut Vec<Output>) {
        let w = self.workers.get_mut(idx);
        if w.current.take().is_some() {
            w.jobs_done += 1;
        }
        self.start_held(now_ms, idx, out);
        self.workers.refresh_idle(idx);
        self.dispatch(now_ms, idx, out);
        // `assign` announced it busy again; otherwise say it is idle now.
        if self.workers.get(idx).current.is_none() {
            self.publish_worker(now_ms, idx, out);
        }
    }

    /// Ends the current attempt of a running job that did not succeed: a retryable
    /// failure with attempts left goes back in line (keeping its place), anything
    /// else ends the job. A job whose cancel was requested ends cancelled.
    pub(super) fn end_attempt(
        &mut self,
        now_ms: u64,
        id: JobId,
        error: JobError,
        out: &mut Vec<Output>,
    ) {
        let Some(job) = self.jobs.get_mut(&id) else {
            return;
        };
        if job.state != JobState::Running {
            return;
        }
        let attempt = job.attempt;
        if !job.uploads.is_empty() || job.finalizing {
            out.push(Output::Artifact(ArtifactOp::Discard {
                job_id: id,
                attempt,
            }));
        }
        job.uploads.clear();
        job.finalizing = false;
        job.progress = None;
        job.run_deadline_ms = None;
        if job.cancel_requested {
            job.error = None;
            self.change(now_ms, id, JobState::Cancelled, "cancelled", out);
            return;
        }
        if error.retryable && job.attempts_used() < job.max_attempts {
            if error.kind == FailureKind::OutOfMemory {
                self.stats.oom_retries += 1;
            }
            let note = format!("attempt {attempt} failed, requeued: {}", error.message);
            tracing::info!(job = %id, attempt, "{note}");
            job.worker = None;
            job.gpu = None;
            job.error = Some(error);
            self.change(now_ms, id, JobState::Queued, note, out);
            self.enqueue(now_ms, id, out);
            return;
        }
        let error = if error.retryable {
            JobError::new(
                FailureKind::MaxAttempts,
                format!(
                    "gave up after {} of {} attempts; last failure ({:?}): {}",
                    job.attempts_used(),
                    job.max_attempts,
                    error.kind,
                    error.message
                ),
                false,
            )
        } else {
            error
        };
        let note = format!("failed: {}", error.message);
        job.error = Some(error);
        self.change(now_ms, id, JobState::Failed, note, out);
    }

    /// Ends a job with its outputs stored.
    pub(super) fn succeed(
        &mut self,
        now_ms: u64,
        id: JobId,
        artifacts: Vec<ArtifactMeta>,
        out: &mut Vec<Output>,
    ) {
        let Some(job) = self.jobs.get_mut(&id) else {
            return;
        };
        self.artifact_bytes += artifacts.iter().map(|a| a.size).sum::<u64>();
        job.artifacts = artifacts;
        job.finalizing = false;
        job.uploads.clear();
        job.run_deadline_ms = None;
        job.error = None;
        if let Some(p) = job.progress.as_mut() {
            p.pct = 100.0;
        }
        self.change(now_ms, id, JobState::Succeeded, "", out);
    }

    /// Ends a queued job without running it (cancel, queue timeout).
    pub(super) fn end_queued(
        &mut self,
        now_ms: u64,
        id: JobId,
        state: JobState,
        error: Option<JobError>,
        out: &mut Vec<Output>,
    ) {
        self.unqueue(id);
        if let Some(idx) = self.unhold(id, true, out) {
            self.dispatch(now_ms, idx, out);
        }
        let Some(job) = self.jobs.get_mut(&id) else {
            return;
        };
        let note = match &error {
            Some(e) => format!("{:?}: {}", e.kind, e.message),
            None => state.as_str().to_string(),
        };
        job.error = error;
        self.change(now_ms, id, state, note, out);
    }
}

impl super::Stats {
    /// Counts a job that reached (or, after a restart, was stored in) `state`.
    pub(super) fn count_finished(&mut self, state: JobState) {
        match state {
            JobState::Succeeded => self.succeeded += 1,
            JobState::Failed => self.failed += 1,
            JobState::Cancelled => self.cancelled += 1,
            JobState::Queued | JobState::Running => {}
        }
    }
}
