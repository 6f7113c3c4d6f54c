//! Worker connections: registration, heartbeats, liveness, and a worker's loss.
//! What a worker sends about a job's *result* is in [`super::results`]; deadlines
//! in [`super::timers`].

use std::sync::Arc;

use kiln_protocol::ids::{check_labels, check_simple_name};
use kiln_protocol::worker::{
    BrokerBeat, BrokerMessage, JobRef, Register, Registered, WorkerError, WorkerMessage,
};
use kiln_protocol::{ErrorBody, ErrorCode, FailureKind, JobError, JobId, JobState};

use super::registry::{FleetRecord, PeerId, Worker, WorkerIdx};
use super::{Core, Output, Record};
use kiln_protocol::auth::token_matches;

pub(super) fn to_worker(out: &mut Vec<Output>, peer: PeerId, msg: BrokerMessage) {
    out.push(Output::ToWorker { peer, msg });
}

fn worker_error(out: &mut Vec<Output>, peer: PeerId, error: ErrorBody) {
    to_worker(out, peer, BrokerMessage::Error(WorkerError { error }));
}

/// Most models one worker may report (bounds the broker's memory per worker).
const MAX_MODELS: usize = 20_000;

/// Most resident models one worker may report.
const MAX_RESIDENT: usize = 64;

impl Core {
    pub(super) fn on_worker_message(
        &mut self,
        now_ms: u64,
        peer: PeerId,
        msg: WorkerMessage,
        out: &mut Vec<Output>,
    ) {
        if let WorkerMessage::Register(r) = msg {
            self.register(now_ms, peer, *r, out);
            return;
        }
        let Some(idx) = self.workers.by_peer(&peer) else {
            // The broker restarted or declared this worker dead: it must register.
            to_worker(out, peer, BrokerMessage::Reregister(BrokerBeat {}));
            return;
        };
        let liveness_ms = self.cfg.liveness_ms();
        let w = self.workers.get_mut(idx);
        w.last_seen_ms = now_ms;
        w.expires_ms = now_ms + liveness_ms;
        match msg {
            WorkerMessage::Register(_) => unreachable!("handled above"),
            WorkerMessage::Heartbeat(h) => {
                let mut gpu = w.gpu.clone();
                gpu.free_vram_mb = h.free_vram_mb;
                gpu.utilization_pct = h.utilization_pct.or(gpu.utilization_pct);
                gpu.temperature_c = h.temperature_c.or(gpu.temperature_c);
                gpu.power_mw = h.power_mw.or(gpu.power_mw);
                w.set_total_vram(gpu);
                if h.loaded_model.is_some() {
                    if h.loaded_model != w.loaded_model {
                        self.stats.model_loads += 1;
                    }
                    w.loaded_model = h.loaded_model;
                }
                if let Some(mut resident) = h.resident {
                    resident.truncate(MAX_RESIDENT);
                    w.resident = resident;
                }
                let warm_fell = self.workers.refresh_warm(idx);
                let w = self.workers.get_mut(idx);
                let was_healthy = w.healthy;
                w.healthy = h.healthy;
                let inventory_changed = h.backends.is_some();
                if let Some(mut backends) = h.backends {
                    truncate_models(&mut backends);
                    w.set_backends(backends);
                }
                if let Some(c) = h.current.filter(|c| w.held.iter().any(|(r, _)| r == c)) {
                    w.held_running = Some(c);
                }
                let held = w.current;
                // Held assignments the worker does not name two beats after they
                // were sent never reached it.
                let grace = 2 * self.cfg.heartbeat_ms;
                let lost_holds: Vec<JobId> = w
                    .held
                    .iter()
                    .filter(|(r, at)| {
                        h.current != Some(*r) && !h.held.contains(r) && now_ms >= at + grace
                    })
                    .map(|(r, _)| r.job_id)
                    .collect();
                to_worker(out, peer, BrokerMessage::Heartbeat(BrokerBeat {}));
                if let Some(held) = held.filter(|r| h.current != Some(*r)) {
                    self.not_held(now_ms, idx, held, out);
                }
                for id in lost_holds {
                    tracing::warn!(job = %id, worker = %self.workers.get(idx).id, "the worker does not hold the job it was given to hold; requeueing");
                    let why = "the assignment never reached its worker".to_string();
                    self.requeue_held(now_ms, id, false, why, out);
                }
                if was_healthy != h.healthy || inventory_changed {
                    self.workers.refresh_idle(idx);
                    if was_healthy != h.healthy {
                        tracing::info!(worker = %self.workers.get(idx).id, healthy = h.healthy, "worker health changed");
                        self.publish_worker(now_ms, idx, out);
                    }
                    if inventory_changed {
                        self.persist_worker(idx, out);
                    }
                    self.dispatch(now_ms, idx, out);
                }
                if warm_fell {
                    // A model fewer GPUs have warm: idle workers that left its
                    // jobs to warm ones may have to load it now.
                    self.offer_idle(now_ms, true, out);
                }
            }
            WorkerMessage::Progress(p) => {
                let r = JobRef {
                    job_id: p.job_id,
                    attempt: p.attempt,
                };
                if !self.is_current(idx, r) {
                    // Progress of a held attempt: its GPU has started it.
                    let w = self.workers.get_mut(idx);
                    if w.held.iter().any(|(h, _)| *h == r) {
                        w.held_running = Some(r);
                    }
                    return;
                }
                let max_stage = self.cfg.limits.max_stage_len;
                let worker = self.workers.get(idx).id.clone();
                let job = self.jobs.get_mut(&p.job_id).expect("current job exists");
                let mut progress = p.progress;
                kiln_protocol::limits::truncate(&mut progress.stage, max_stage);
                // Never let the percentage run backwards within an attempt.
                let floor = job.progress.as_ref().map_or(0.0, |q| q.pct);
                progress.pct = if progress.pct.is_finite() {
                    progress.pct.clamp(floor, 100.0)
                } else {
                    floor
                };
                job.seq += 1;
                job.progress = Some(progress.clone());
                out.push(Output::Publish(kiln_protocol::Event::JobProgress(
                    kiln_protocol::event::JobProgressEvent {
                        job_id: p.job_id,
                        seq: job.seq,
                        attempt: p.attempt,
                        worker,
                        gpu: job.gpu.clone().unwrap_or_else(|| Arc::from("")),
                        progress,
                    },
                )));
            }
            WorkerMessage::Upload(u) => self.on_upload(now_ms, idx, u, out),
            WorkerMessage::Refused(r) => self.on_refused(now_ms, idx, r, out),
            WorkerMessage::Finished(f) => self.on_finished(now_ms, idx, f, out),
            WorkerMessage::Goodbye(g) => {
                // A worker stopping on purpose (SIGTERM, a deploy, a restart) is
                // not the job's fault: its attempt is not charged, as for a
                // refused assignment, so restarts never use up a job's attempts.
                if let Some(cur) = self.workers.get(idx).current {
                    if self.is_current(idx, cur) {
                        if let Some(job) = self.jobs.get_mut(&cur.job_id) {
                            job.refusals += 1;
                        }
                    }
                }
                let reason = if g.reason.is_empty() {
                    "said goodbye".to_string()
                } else {
                    format!("said goodbye: {}", g.reason)
                };
                // An orderly departure (a stopped job is requeued and noted in
                // its history): not a warning.
                self.worker_gone(now_ms, idx, &reason, true, out);
            }
        }
    }

    pub(super) fn is_current(&self, idx: WorkerIdx, r: JobRef) -> bool {
        let w = self.workers.get(idx);
        w.current == Some(r)
            && self.jobs.get(&r.job_id).is_some_and(|j| {
                j.state == JobState::Running
                    && j.attempt == r.attempt
                    && j.worker.as_deref() == Some(&*w.id)
            })
    }

    fn register(&mut self, now_ms: u64, peer: PeerId, mut r: Register, out: &mut Vec<Output>) {
        if let Some(expected) = &self.cfg.worker_token {
            if !token_matches(r.token.as_deref(), expected) {
                self.stats.protocol_errors += 1;
                tracing::warn!(worker = %r.worker_id.chars().take(64).collect::<String>(), "refused a worker with a wrong or missing token");
                worker_error(
                    out,
                    peer,
                    ErrorBody::new(ErrorCode::Unauthenticated, "wrong or missing worker token"),
                );
                return;
            }
        }
        let limits = &self.cfg.limits;
        let named =
            check_simple_name("worker_id", &r.worker_id, limits.max_label_len).and_then(|()| {
                check_labels("labels", &r.labels, limits.max_labels, limits.max_label_len)
            });
        if let Err(err) = named {
            self.stats.protocol_errors += 1;
            worker_error(out, peer, err.to_body());
            return;
        }
        truncate_models(&mut r.backends);
        let liveness_ms = self.cfg.liveness_ms();
        let idx = match self.workers.by_id(&r.worker_id) {
            Some(idx) => {
                let w = self.workers.get(idx);
                if let Some(cur) = w.current {
                    let keeps_it =
                        r.current == Some(cur) || r.unacked == Some(cur) || r.held.contains(&cur);
                    if !keeps_it {
                        let why = if w.instance == r.instance {
                            "re-registered without its job"
                        } else {
                            "was replaced by a new process"
                        };
                        self.worker_lost(now_ms, idx, why, out);
                    }
                }
                idx
            }
            None => self.workers.insert(Worker::from_record(FleetRecord {
                worker_id: r.worker_id.clone(),
                hostname: String::new(),
                gpu: r.gpu.clone(),
                backends: Vec::new(),
                labels: Vec::new(),
                last_seen_ms: now_ms,
                version: String::new(),
            })),
        };
        let healthy = r.backends.iter().any(|b| b.healthy);
        let w = self.workers.get_mut(idx);
        w.instance = r.instance;
        w.hostname = r.hostname;
        w.version = r.version;
        w.set_total_vram(r.gpu);
        w.set_backends(r.backends);
        w.set_labels(r.labels);
        w.loaded_model = r.loaded_model;
        w.resident = r.resident;
        w.resident.truncate(MAX_RESIDENT);
        w.max_held = r.max_held.min(self.cfg.max_held);
        w.healthy = healthy;
        w.online = true;
        w.last_seen_ms = now_ms;
        w.expires_ms = now_ms + liveness_ms;
        let current = w.current;
        let worker_id = w.id.clone();
        // Held attempts the worker no longer names go back in line.
        let claims: Vec<JobRef> = r
            .current
            .into_iter()
            .chain(r.unacked)
            .chain(r.held.iter().copied())
            .collect();
        let dropped: Vec<JobId> = w
            .held
            .iter()
            .filter(|(h, _)| !claims.contains(h))
            .map(|(h, _)| h.job_id)
            .collect();
        let broker_held: Vec<JobRef> = w.held.iter().map(|(h, _)| *h).collect();
        self.workers.attach_peer(idx, peer.clone());
        self.workers.refresh_idle(idx);
        self.persist_worker(idx, out);
        tracing::info!(worker = %worker_id, "worker registered");
        to_worker(
            out,
            peer.clone(),
            BrokerMessage::Registered(Registered {
                heartbeat_ms: self.cfg.heartbeat_ms,
                liveness: self.cfg.liveness,
                chunk_bytes: self.cfg.limits.max_chunk_bytes,
                max_outputs: Some(self.cfg.limits.max_artifacts_per_job),
            }),
        );
        for id in dropped {
            let why = "its worker re-registered without it".to_string();
            self.requeue_held(now_ms, id, false, why, out);
        }
        // What the worker holds that the broker no longer wants: stop it, forget it.
        let wanted = |c: &JobRef| Some(*c) == current || broker_held.contains(c);
        for staged in r.held.iter().filter(|c| !wanted(c)) {
            to_worker(out, peer.clone(), BrokerMessage::Cancel(*staged));
        }
        if let Some(running) = r.current.filter(|c| !wanted(c)) {
            tracing::info!(worker = %worker_id, job = %running.job_id, attempt = running.attempt, "telling a re-registered worker to drop a stale attempt");
            to_worker(out, peer.clone(), BrokerMessage::Cancel(running));
        }
        if let Some(done) = r.unacked.filter(|c| !wanted(c)) {
            self.stats.stale_results += 1;
            tracing::warn!(
                worker = %worker_id, job = %done.job_id, attempt = done.attempt,
                "ignoring the result of stale attempt {} of {} held by a re-registering worker: the job has moved on",
                done.attempt, done.job_id
            );
            to_worker(out, peer, BrokerMessage::ResultAck(done));
        }
        self.publish_worker(now_ms, idx, out);
        self.dispatch(now_ms, idx, out);
    }

    fn persist_worker(&self, idx: WorkerIdx, out: &mut Vec<Output>) {
        if !self.cfg.persist {
            return;
        }
        let w = self.workers.get(idx);
        out.push(Output::Persist(Record::Worker {
            id: w.id.to_string(),
            bytes: rmp_serde::to_vec_named(&w.record()).expect("fleet records encode"),
        }));
    }

    /// A worker is gone (missed heartbeats, goodbye, replaced, unreachable): its
    /// attempt ends as retryable and the worker is kept, offline, in the fleet.
    pub(super) fn worker_lost(
        &mut self,
        now_ms: u64,
        idx: WorkerIdx,
        why: &str,
        out: &mut Vec<Output>,
    ) {
        self.worker_gone(now_ms, idx, why, false, out);
    }

    /// A worker is gone; `said_goodbye` when it left in order (logged as info,
    /// not as a warning).
    fn worker_gone(
        &mut self,
        now_ms: u64,
        idx: WorkerIdx,
        why: &str,
        said_goodbye: bool,
        out: &mut Vec<Output>,
    ) {
        let w = self.workers.get_mut(idx);
        let was_online = w.online;
        w.online = false;
        w.offline_reason = Some(why.to_string());
        let current = w.current.take();
        let id = w.id.clone();
        self.workers.detach_peer(idx);
        self.workers.refresh_idle(idx);
        if said_goodbye {
            tracing::info!(worker = %id, "worker left: {why}");
        } else if was_online || current.is_some() {
            tracing::warn!(worker = %id, "worker lost: {why}");
        }
        self.requeue_all_held(now_ms, idx, &format!("worker {id} {why}"), out);
        if let Some(cur) = current {
            let still_running = self
                .jobs
                .get(&cur.job_id)
                .is_some_and(|j| j.state == JobState::Running && j.attempt == cur.attempt);
            if still_running {
                let err = JobError::new(
                    FailureKind::WorkerLost,
                    format!("worker {id} {why} during attempt {}", cur.attempt),
                    true,
                );
                self.end_attempt(now_ms, cur.job_id, err, out);
            }
        }
        self.publish_worker(now_ms, idx, out);
    }

    /// A heartbeat does not name the attempt the broker thinks the worker holds.
    /// For the current attempt, two heartbeats after the assignment, that means the
    /// assignment never arrived: requeue it. For a stale attempt the worker was
    /// busy with, it means the worker is done with it.
    fn not_held(&mut self, now_ms: u64, idx: WorkerIdx, held: JobRef, out: &mut Vec<Output>) {
        if !self.is_current(idx, held) {
            self.release_worker(now_ms, idx, out);
            return;
        }
        let grace = 2 * self.cfg.heartbeat_ms;
        let job = &self.jobs[&held.job_id];
        let assigned_ms = job.started_ms.unwrap_or(now_ms);
        if job.finalizing || now_ms < assigned_ms + grace {
            return; // the result is being verified, or the heartbeat crossed the assignment
        }
        tracing::warn!(job = %held.job_id, attempt = held.attempt, worker = %self.workers.get(idx).id, "the worker does not hold its assignment; it was lost on the way, requeueing");
        let err = JobError::new(
            FailureKind::WorkerLost,
            "the assignment never reached the worker",
            true,
        );
        self.end_attempt(now_ms, held.job_id, err, out);
        self.release_worker(now_ms, idx, out);
    }

    /// The worker is still busy with another attempt: requeue the refused job
    /// without charging it an attempt, count the worker busy with what it runs, and
    /// stop that if it is stale.
    fn on_refused(
        &mut self,
        now_ms: u64,
        idx: WorkerIdx,
        r: kiln_protocol::worker::Refused,
        out: &mut Vec<Output>,
    ) {
        let refused = JobRef {
            job_id: r.job_id,
            attempt: r.attempt,
        };
        let wid = self.workers.get(idx).id.clone();
        if self
            .workers
            .get(idx)
            .held
            .iter()
            .any(|(h, _)| *h == refused)
        {
            // It cannot hold as many as it said: hold no more on it until it
            // registers again.
            tracing::warn!(worker = %wid, job = %r.job_id, "worker refused to hold an assignment");
            self.workers.get_mut(idx).max_held = 0;
            let why = format!("{wid} could not hold it");
            self.requeue_held(now_ms, r.job_id, false, why, out);
            return;
        }
        tracing::warn!(worker = %wid, job = %r.job_id, busy_with = %r.busy_with.job_id, "worker refused an assignment while busy");
        if self.is_current(idx, refused) {
            if let Some(job) = self.jobs.get_mut(&r.job_id) {
                job.refusals += 1;
            }
            let err = JobError::new(
                FailureKind::WorkerLost,
                format!(
                    "{wid} was still busy with attempt {} of {}",
                    r.busy_with.attempt, r.busy_with.job_id
                ),
                true,
            );
            self.end_attempt(now_ms, r.job_id, err, out);
        }
        let peer = self.workers.get(idx).peer.clone();
        self.workers.get_mut(idx).current = Some(r.busy_with);
        if !self.is_current(idx, r.busy_with) {
            if let Some(peer) = peer {
                to_worker(out, peer, BrokerMessage::Cancel(r.busy_with));
            }
        }
        self.workers.refresh_idle(idx);
        self.publish_worker(now_ms, idx, out);
    }

    /// Declares silent workers dead and forgets long-offline idle ones.
    pub(super) fn scan_workers(&mut self, now_ms: u64, out: &mut Vec<Output>) {
        for idx in self.workers.indices() {
            let w = self.workers.get(idx);
            let holds_job = w.current.is_some();
            if (w.online || holds_job) && w.expires_ms <= now_ms {
                let why = if w.online {
                    format!("missed {} heartbeats", self.cfg.liveness)
                } else {
                    "did not re-register after the broker restarted".to_string()
                };
                self.worker_lost(now_ms, idx, &why, out);
            } else if !w.online
                && !holds_job
                && now_ms.saturating_sub(w.last_seen_ms) >= self.cfg.fleet_memory_ms
            {
                let w = self.workers.remove(idx).expect("present");
                if self.cfg.persist {
                    out.push(Output::Persist(Record::DeleteWorker(w.id.to_string())));
                }
            }
        }
        // A held job whose holder overran its expected time may be worth a
        // load on an idle worker by now (see `Core::busy_for_ms`).
        if self.cfg.load_aware && !self.held_priorities.is_empty() {
            let idle: Vec<WorkerIdx> = self.workers.idle().collect();
            for idx in idle {
                self.steal_held(now_ms, idx, out);
            }
        }
    }

    /// Offers the queue to every idle worker after something that may make a
    /// load worth it (see [`super::placement`]); with `steal`, a worker that
    /// finds nothing there may take over a held job as well.
    pub(super) fn offer_idle(&mut self, now_ms: u64, steal: bool, out: &mut Vec<Output>) {
        if self.queue.is_empty() || !self.cfg.load_aware {
            return;
        }
        let idle: Vec<WorkerIdx> = self.workers.idle().collect();
        for idx in idle {
            if self.dispatch_queued(now_ms, idx, out) && steal {
                self.steal_held(now_ms, idx, out);
            }
        }
    }
}

/// Caps the models a worker reports so one worker cannot bloat the broker.
fn truncate_models(backends: &mut [kiln_protocol::worker::BackendInventory]) {
    let mut budget = MAX_MODELS;
    for b in backends {
        b.models.truncate(budget);
        budget -= b.models.len();
        for m in &mut b.models {
            kiln_protocol::limits::truncate(&mut m.name, 256);
            kiln_protocol::limits::truncate(&mut m.kind, 64);
        }
    }
}
