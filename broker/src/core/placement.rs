//! Placement: which worker a job goes to, and which job a worker takes next.
//!
//! A model load costs tens of seconds on a real GPU, often more than the
//! generation itself, so placement counts it: a job goes to a worker that has its
//! model resident before one that would have to load it, then to the one with the
//! most free memory.

use std::cmp::Reverse;

use kiln_protocol::JobId;

use super::registry::WorkerIdx;
use super::Core;

/// How well a worker suits a job; higher is better.
pub(super) type Key = (bool, u64, Reverse<WorkerIdx>);

impl Core {
    /// Ranks worker `idx` for job `id`: its model resident first, then free memory,
    /// then the lowest index (stable choices).
    pub(super) fn placement_key(&self, id: JobId, idx: WorkerIdx) -> Key {
        let job = &self.jobs[&id];
        let w = self.workers.get(idx);
        let warm = job.spec.model.as_deref().is_some_and(|m| w.has_resident(m));
        (warm, w.gpu.free_vram_mb, Reverse(idx))
    }

    /// Takes the next queued job for worker `idx` among the classes `runnable`
    /// marks, by the queue's order (priority, then fairness between clients, then
    /// FIFO).
    pub(super) fn pop_for_worker(&mut self, _idx: WorkerIdx, runnable: &[bool]) -> Option<JobId> {
        self.queue.pop_for(|class| runnable[class as usize])
    }
}
