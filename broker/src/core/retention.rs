//! Retention: finished jobs older than the age limit, or the oldest while
//! artifacts exceed the size limit, are removed with their files.

use kiln_protocol::JobId;

use super::{ArtifactOp, Core, Output, Record};

impl Core {
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
}
