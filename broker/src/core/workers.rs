//! Worker messages, liveness, timers, recovery and retention.

use std::sync::Arc;

use kiln_protocol::ids::{check_labels, check_simple_name};
use kiln_protocol::job::safe_file_name;
use kiln_protocol::worker::{
    BrokerBeat, BrokerMessage, Finished, JobRef, Outcome, Register, Registered, Upload,
    WorkerError, WorkerMessage,
};
use kiln_protocol::{
    ArtifactId, ArtifactMeta, ErrorBody, ErrorCode, FailureKind, JobError, JobId, JobState,
};

use super::job::{self, Job};
use super::registry::{FleetRecord, PeerId, Worker, WorkerIdx};
use super::{ArtifactOp, Core, Output, Record, Timer, TimerKind};
use kiln_protocol::auth::token_matches;

fn to_worker(out: &mut Vec<Output>, peer: PeerId, msg: BrokerMessage) {
    out.push(Output::ToWorker { peer, msg });
}

fn worker_error(out: &mut Vec<Output>, peer: PeerId, error: ErrorBody) {
    to_worker(out, peer, BrokerMessage::Error(WorkerError { error }));
}

/// Lowest setting a job is taken down to after running out of memory.
pub const MAX_DEGRADE: u8 = 3;

/// Most models one worker may report (bounds the broker's memory per worker).
const MAX_MODELS: usize = 20_000;

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
                w.set_total_vram(gpu);
                if h.loaded_model.is_some() {
                    w.loaded_model = h.loaded_model;
                }
                let was_healthy = w.healthy;
                w.healthy = h.healthy;
                let inventory_changed = h.backends.is_some();
                if let Some(mut backends) = h.backends {
                    truncate_models(&mut backends);
                    w.set_backends(backends);
                }
                let held = w.current;
                to_worker(out, peer, BrokerMessage::Heartbeat(BrokerBeat {}));
                if let Some(held) = held.filter(|r| h.current != Some(*r)) {
                    self.not_held(now_ms, idx, held, out);
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
            }
            WorkerMessage::Progress(p) => {
                let r = JobRef {
                    job_id: p.job_id,
                    attempt: p.attempt,
                };
                if !self.is_current(idx, r) {
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
                let reason = if g.reason.is_empty() {
                    "said goodbye".to_string()
                } else {
                    format!("said goodbye: {}", g.reason)
                };
                self.worker_lost(now_ms, idx, &reason, out);
            }
        }
    }

    fn is_current(&self, idx: WorkerIdx, r: JobRef) -> bool {
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
                    let keeps_it = r.current == Some(cur) || r.unacked == Some(cur);
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
        w.healthy = healthy;
        w.online = true;
        w.last_seen_ms = now_ms;
        w.expires_ms = now_ms + liveness_ms;
        let current = w.current;
        let worker_id = w.id.clone();
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
            }),
        );
        // What the worker holds that the broker no longer wants: stop it, forget it.
        if let Some(running) = r.current.filter(|c| Some(*c) != current) {
            tracing::info!(worker = %worker_id, job = %running.job_id, attempt = running.attempt, "telling a re-registered worker to drop a stale attempt");
            to_worker(out, peer.clone(), BrokerMessage::Cancel(running));
        }
        if let Some(done) = r.unacked.filter(|c| Some(*c) != current) {
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
        let w = self.workers.get_mut(idx);
        let was_online = w.online;
        w.online = false;
        let current = w.current.take();
        let id = w.id.clone();
        self.workers.detach_peer(idx);
        self.workers.refresh_idle(idx);
        if was_online || current.is_some() {
            tracing::warn!(worker = %id, "worker lost: {why}");
        }
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

    fn on_upload(&mut self, _now_ms: u64, idx: WorkerIdx, u: Upload, out: &mut Vec<Output>) {
        let r = JobRef {
            job_id: u.job_id,
            attempt: u.attempt,
        };
        if !self.is_current(idx, r) {
            return; // a piece of a stale attempt
        }
        let limits = &self.cfg.limits;
        let job = self.jobs.get_mut(&u.job_id).expect("current job exists");
        if job.finalizing {
            return;
        }
        let problem = if u.index as u64 >= limits.max_artifacts_per_job {
            Some(format!(
                "output index {} over the limit of {}",
                u.index, limits.max_artifacts_per_job
            ))
        } else if safe_file_name(&u.name).is_none() || u.name.len() as u64 > limits.max_name_len {
            Some(format!(
                "output name {:?} is not a plain file name",
                u.name.chars().take(80).collect::<String>()
            ))
        } else if u.media_type.len() > 128 {
            Some("media type longer than 128 bytes".to_string())
        } else if u.total > limits.max_artifact_bytes {
            Some(format!(
                "output of {} bytes over the limit of {}",
                u.total, limits.max_artifact_bytes
            ))
        } else if u.data.len() as u64 > limits.max_chunk_bytes {
            Some(format!(
                "upload piece of {} bytes over the limit of {}",
                u.data.len(),
                limits.max_chunk_bytes
            ))
        } else if u.offset + u.data.len() as u64 > u.total {
            Some("upload piece runs past the declared size".to_string())
        } else {
            let slot = job.uploads.iter().position(|x| x.index == u.index);
            match (slot, u.offset) {
                (slot, 0) => {
                    // A piece at offset 0 starts the output (again).
                    let fresh = job::Upload {
                        index: u.index,
                        name: u.name.clone(),
                        media_type: u.media_type.clone(),
                        total: u.total,
                        received: 0,
                    };
                    match slot {
                        Some(i) => job.uploads[i] = fresh,
                        None => job.uploads.push(fresh),
                    }
                    None
                }
                (Some(i), off)
                    if job.uploads[i].received == off && job.uploads[i].total == u.total =>
                {
                    None
                }
                _ => Some(format!(
                    "upload of output {} out of order at offset {}",
                    u.index, u.offset
                )),
            }
        };
        if let Some(problem) = problem {
            tracing::warn!(job = %u.job_id, attempt = u.attempt, "{problem}");
            let peer = self.workers.get(idx).peer.clone();
            if let Some(peer) = peer {
                to_worker(out, peer, BrokerMessage::Cancel(r));
            }
            let err = JobError::new(FailureKind::Artifact, problem, true);
            self.end_attempt(_now_ms, u.job_id, err, out);
            return;
        }
        let upload = job
            .uploads
            .iter_mut()
            .find(|x| x.index == u.index)
            .expect("ensured above");
        upload.received += u.data.len() as u64;
        out.push(Output::Artifact(ArtifactOp::Write {
            job_id: u.job_id,
            attempt: u.attempt,
            index: u.index,
            name: u.name,
            offset: u.offset,
            data: u.data,
        }));
    }

    fn on_finished(&mut self, now_ms: u64, idx: WorkerIdx, f: Finished, out: &mut Vec<Output>) {
        let r = JobRef {
            job_id: f.job_id,
            attempt: f.attempt,
        };
        let peer = self.workers.get(idx).peer.clone();
        if f.loaded_model.is_some() {
            self.workers.get_mut(idx).loaded_model = f.loaded_model.clone();
        }
        if !self.is_current(idx, r) {
            self.stats.stale_results += 1;
            let w = self.workers.get(idx);
            tracing::warn!(
                worker = %w.id, job = %f.job_id, attempt = f.attempt,
                "ignoring the result of stale attempt {} of {}: the job has moved on",
                f.attempt, f.job_id
            );
            if let Some(peer) = peer {
                to_worker(out, peer, BrokerMessage::ResultAck(r));
            }
            if w.current == Some(r) {
                self.release_worker(now_ms, idx, out);
            }
            return;
        }
        let job = self.jobs.get_mut(&f.job_id).expect("current job exists");
        if job.finalizing {
            return; // a resend while the outputs are being verified
        }
        match f.outcome {
            Outcome::Succeeded { outputs, info } => {
                let limits = &self.cfg.limits;
                let complete = outputs.len() == job.uploads.len()
                    && outputs.len() as u64 <= limits.max_artifacts_per_job
                    && outputs.iter().all(|o| {
                        job.uploads.iter().any(|u| {
                            u.index == o.index
                                && u.name == o.name
                                && u.total == o.size
                                && u.received == o.size
                        })
                    });
                if !complete {
                    let err = JobError::new(
                        FailureKind::Artifact,
                        format!(
                            "worker reported {} output(s) but {} arrived complete",
                            outputs.len(),
                            job.uploads.iter().filter(|u| u.received == u.total).count()
                        ),
                        true,
                    );
                    self.end_attempt(now_ms, f.job_id, err, out);
                    self.ack_and_release(now_ms, idx, r, out);
                    return;
                }
                job.info = info;
                if outputs.is_empty() {
                    self.succeed(now_ms, f.job_id, Vec::new(), out);
                    self.ack_and_release(now_ms, idx, r, out);
                } else {
                    job.finalizing = true;
                    out.push(Output::Artifact(ArtifactOp::Finalize {
                        job_id: f.job_id,
                        attempt: f.attempt,
                        outputs,
                    }));
                }
            }
            Outcome::Failed { mut error } => {
                kiln_protocol::limits::truncate(&mut error.message, self.cfg.limits.max_error_len);
                if error.kind == FailureKind::OutOfMemory {
                    error = self.after_out_of_memory(now_ms, idx, f.job_id, error);
                }
                self.end_attempt(now_ms, f.job_id, error, out);
                self.ack_and_release(now_ms, idx, r, out);
            }
            Outcome::Cancelled => {
                let job = self.jobs.get_mut(&f.job_id).expect("current job exists");
                job.cancel_requested = true;
                let err = JobError::new(FailureKind::Backend, "cancelled by the worker", false);
                self.end_attempt(now_ms, f.job_id, err, out);
                self.ack_and_release(now_ms, idx, r, out);
            }
        }
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

    /// Out of memory on this GPU: the next attempt needs a bigger one. If the
    /// fleet has none, a job that allows it runs again one setting lower;
    /// otherwise the failure is final.
    fn after_out_of_memory(
        &mut self,
        now_ms: u64,
        idx: WorkerIdx,
        id: JobId,
        error: JobError,
    ) -> JobError {
        let w = self.workers.get(idx);
        let (had, name, wid) = (w.gpu.total_vram_mb, w.gpu.name.clone(), w.id.clone());
        let job = self.jobs.get_mut(&id).expect("current job exists");
        let before = job.min_vram_mb;
        job.min_vram_mb = job.min_vram_mb.max(had + 1);
        let req = self.requirements(id);
        match self.fleet_can_run(now_ms, &req) {
            Ok(()) => JobError::new(
                FailureKind::OutOfMemory,
                format!(
                    "{} (on {wid}, {name} with {had} MiB; retrying on a GPU with more memory)",
                    error.message
                ),
                true,
            ),
            Err(_) => {
                let job = self.jobs.get_mut(&id).expect("exists");
                job.min_vram_mb = before;
                if job.spec.allow_degrade && job.degrade < MAX_DEGRADE {
                    job.degrade += 1;
                    return JobError::new(
                        FailureKind::OutOfMemory,
                        format!(
                            "{} (on {wid}, {name} with {had} MiB; no GPU in the fleet has more, so retrying at the next lower setting, level {})",
                            error.message, job.degrade
                        ),
                        true,
                    );
                }
                JobError::new(
                    FailureKind::OutOfMemory,
                    format!(
                        "{} (on {wid}, {name} with {had} MiB; no GPU in the fleet has more)",
                        error.message
                    ),
                    false,
                )
            }
        }
    }

    fn ack_and_release(&mut self, now_ms: u64, idx: WorkerIdx, r: JobRef, out: &mut Vec<Output>) {
        if let Some(peer) = self.workers.get(idx).peer.clone() {
            to_worker(out, peer, BrokerMessage::ResultAck(r));
        }
        if self.workers.get(idx).current == Some(r) {
            self.release_worker(now_ms, idx, out);
        }
    }

    pub(super) fn on_artifacts_stored(
        &mut self,
        now_ms: u64,
        id: JobId,
        attempt: u32,
        result: Result<Vec<ArtifactMeta>, String>,
        out: &mut Vec<Output>,
    ) {
        let r = JobRef {
            job_id: id,
            attempt,
        };
        let holder = self
            .jobs
            .get(&id)
            .filter(|j| j.state == JobState::Running && j.attempt == attempt && j.finalizing)
            .and_then(|j| j.worker.as_deref())
            .and_then(|w| self.workers.by_id(w))
            .filter(|idx| self.workers.get(*idx).current == Some(r));
        let Some(idx) = holder else {
            // The attempt ended meanwhile (cancel grace, worker lost): drop the files.
            if result.is_ok() {
                out.push(Output::Artifact(ArtifactOp::Discard {
                    job_id: id,
                    attempt,
                }));
            }
            return;
        };
        match result {
            Ok(metas) => self.succeed(now_ms, id, metas, out),
            Err(problem) => {
                tracing::warn!(job = %id, attempt, "outputs failed verification: {problem}");
                let job = self.jobs.get_mut(&id).expect("exists");
                job.finalizing = false;
                let err = JobError::new(FailureKind::Artifact, problem, true);
                self.end_attempt(now_ms, id, err, out);
            }
        }
        self.ack_and_release(now_ms, idx, r, out);
    }

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
    fn stop_on_worker(&self, id: JobId, attempt: u32, out: &mut Vec<Output>) {
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
    }

    /// Removes finished jobs past the age limit, then the oldest finished jobs
    /// while artifacts take more than the size limit.
    pub(super) fn apply_retention(&mut self, now_ms: u64, out: &mut Vec<Output>) {
        let max_age = self.cfg.retention_max_age_ms;
        let max_bytes = self.cfg.retention_max_bytes;
        if max_age == 0 && max_bytes == 0 {
            return;
        }
        let mut finished: Vec<(u64, JobId)> = self
            .jobs
            .values()
            .filter(|j| j.state.is_terminal())
            .map(|j| (j.finished_ms.unwrap_or(j.created_ms), j.id))
            .collect();
        finished.sort_unstable();
        for (finished_ms, id) in finished {
            let too_old = max_age > 0 && now_ms.saturating_sub(finished_ms) > max_age;
            let too_big = max_bytes > 0 && self.artifact_bytes > max_bytes;
            if !(too_old || too_big) {
                break;
            }
            self.delete_job(id, out);
        }
    }

    fn delete_job(&mut self, id: JobId, out: &mut Vec<Output>) {
        let Some(job) = self.jobs.remove(&id) else {
            return;
        };
        let bytes: u64 = job.artifacts.iter().map(|a| a.size).sum();
        self.artifact_bytes = self.artifact_bytes.saturating_sub(bytes);
        if let Some(key) = &job.spec.idempotency_key {
            self.idempotency.remove(&(job.client.clone(), key.clone()));
        }
        if self.cfg.persist {
            out.push(Output::Persist(Record::DeleteJob(id)));
        }
        if !job.artifacts.is_empty() {
            out.push(Output::Artifact(ArtifactOp::Delete { job_id: id }));
        }
    }

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
        let grace = now_ms + 2 * self.cfg.liveness_ms();
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

    /// The id the next artifact of a job gets.
    pub fn artifact_id(job_id: JobId, index: u16) -> ArtifactId {
        ArtifactId { job: job_id, index }
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
