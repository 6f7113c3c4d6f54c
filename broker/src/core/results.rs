//! A job's result coming back from its worker: output uploads, `finished`, the
//! verification of the stored outputs, and what out-of-memory means for the next
//! attempt.

use kiln_protocol::job::safe_file_name;
use kiln_protocol::worker::{BrokerMessage, Finished, JobRef, Outcome, Upload};
use kiln_protocol::{ArtifactId, ArtifactMeta, FailureKind, JobError, JobId, JobState};

use super::job;
use super::registry::WorkerIdx;
use super::workers::to_worker;
use super::{ArtifactOp, Core, Output};

/// Lowest setting a job is taken down to after running out of memory.
pub const MAX_DEGRADE: u8 = 3;

impl Core {
    pub(super) fn on_upload(
        &mut self,
        _now_ms: u64,
        idx: WorkerIdx,
        u: Upload,
        out: &mut Vec<Output>,
    ) {
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
        // Too many outputs is a property of the job (its graph, its batch size):
        // another attempt would make as many, so it is not retried.
        let mut retryable = true;
        let problem = if u.index as u64 >= limits.max_artifacts_per_job {
            retryable = false;
            Some(kiln_protocol::limits::too_many_outputs(
                &format!(
                    "the job made more than {} outputs",
                    limits.max_artifacts_per_job
                ),
                limits.max_artifacts_per_job,
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
            let err = JobError::new(FailureKind::Artifact, problem, retryable);
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

    pub(super) fn on_finished(
        &mut self,
        now_ms: u64,
        idx: WorkerIdx,
        f: Finished,
        out: &mut Vec<Output>,
    ) {
        let r = JobRef {
            job_id: f.job_id,
            attempt: f.attempt,
        };
        let peer = self.workers.get(idx).peer.clone();
        if f.loaded_model.is_some() {
            let w = self.workers.get_mut(idx);
            if w.loaded_model != f.loaded_model {
                self.stats.model_loads += 1;
            }
            w.loaded_model = f.loaded_model.clone();
            self.workers.refresh_warm(idx);
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
                if let Some(model) = &job.spec.model {
                    self.costs.observe(model, &info, job.cold);
                    let w = self.workers.get_mut(idx);
                    if job.cold && !w.has_resident(model) {
                        // It ran there: loaded now (counted when the worker is
                        // released; its next report says what else is).
                        w.loaded_model = Some(model.clone());
                    }
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
                // Only when another attempt will run: otherwise the error would
                // promise a retry that never comes and the snapshot would show a
                // level no attempt ran at.
                let retries = job.attempts_used() < job.max_attempts;
                if job.spec.allow_degrade && job.degrade < MAX_DEGRADE && retries {
                    job.degrade += 1;
                    self.stats.degrades += 1;
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

    /// The id the next artifact of a job gets.
    pub fn artifact_id(job_id: JobId, index: u16) -> ArtifactId {
        ArtifactId { job: job_id, index }
    }
}
