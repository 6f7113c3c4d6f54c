//! Placement: which worker a job goes to, and which job a worker takes next.
//!
//! A model load costs tens of seconds on a real GPU, often more than the
//! generation itself, so placement counts it:
//!
//! - A new job goes to an idle worker with its model resident, else to the idle
//!   worker with the most free memory (an idle GPU never waits behind a warm
//!   one's queue), else it is held by a busy worker (warm first).
//! - A worker that is free takes, among the jobs it could run next (the oldest of
//!   each class of the next 8 clients in rotation, at the top priority), one
//!   whose model it has
//!   resident, clients in their round-robin order. With none warm, it loads the
//!   model whose waiting jobs have the fewest warm GPUs per job (a burst of one
//!   model spreads over more GPUs when its queue is worth another load).
//! - Fairness bound: priorities are never crossed, and a job at the head of its
//!   client's line that has waited `affinity_max_wait_ms` (default 120 s) is taken
//!   before any warm work, clients in round-robin order. Within that bound a
//!   client's jobs of a warm model may pass its older jobs of another model;
//!   jobs of one class stay FIFO.

use std::cmp::Reverse;

use kiln_protocol::JobId;

use super::registry::WorkerIdx;
use super::Core;

/// How well a worker suits a job; higher is better.
pub(super) type Key = (bool, u64, Reverse<WorkerIdx>);

/// Clients whose next jobs a free worker considers, in rotation order: bounds
/// the cost of a decision with thousands of clients waiting.
const CANDIDATE_CLIENTS: usize = 8;

/// A waiting model deserves another GPU when it has more waiting jobs than this
/// per GPU that has it resident.
const SPREAD_JOBS_PER_GPU: u32 = 2;

impl Core {
    /// Ranks worker `idx` for job `id`: its model resident first, then free memory,
    /// then the lowest index (stable choices).
    pub(super) fn placement_key(&self, id: JobId, idx: WorkerIdx) -> Key {
        let job = &self.jobs[&id];
        let w = self.workers.get(idx);
        let warm =
            self.cfg.load_aware && job.spec.model.as_deref().is_some_and(|m| w.has_resident(m));
        let legacy_warm = job.spec.model.is_some() && w.loaded_model == job.spec.model;
        (warm || legacy_warm, w.gpu.free_vram_mb, Reverse(idx))
    }

    /// Takes the next queued job for worker `idx` among the classes `runnable`
    /// marks (see the module docs).
    pub(super) fn pop_for_worker(
        &mut self,
        now_ms: u64,
        idx: WorkerIdx,
        runnable: &[bool],
    ) -> Option<JobId> {
        if !self.cfg.load_aware {
            return self.queue.pop_for(|class| runnable[class as usize]);
        }
        let mut cands = std::mem::take(&mut self.candidates);
        self.queue.candidates(
            |class| runnable[class as usize],
            CANDIDATE_CLIENTS,
            &mut cands,
        );
        let chosen = self.choose(now_ms, idx, &cands);
        let job = chosen.map(|i| self.queue.take(&cands[i]));
        self.candidates = cands;
        job
    }

    fn choose(
        &self,
        now_ms: u64,
        idx: WorkerIdx,
        cands: &[super::queue::Candidate],
    ) -> Option<usize> {
        if cands.is_empty() {
            return None;
        }
        // Candidates come in rotation order (by `turn`, then class).
        let overdue = cands.iter().position(|c| {
            let job = &self.jobs[&c.job];
            now_ms.saturating_sub(job.created_ms) >= self.cfg.affinity_max_wait_ms
        });
        if let Some(i) = overdue {
            return Some(i);
        }
        let w = self.workers.get(idx);
        let model_of = |i: usize| {
            let req = self.queue.requirements(cands[i].class);
            req.model.as_deref()
        };
        let warm = (0..cands.len()).find(|&i| model_of(i).is_none_or(|m| w.has_resident(m)));
        if let Some(i) = warm {
            return Some(i);
        }
        // Nothing warm: load the model that is most short of GPUs for its queue.
        let need = |i: usize| {
            let waiting = self.queue.class_len(cands[i].class);
            let warm = model_of(i).map_or(0, |m| self.workers.warm_count(m));
            // Waiting jobs per warm GPU, counting this one.
            (waiting as u64 * 1000) / (warm as u64 + 1)
        };
        let under = (0..cands.len()).filter(|&i| {
            let waiting = self.queue.class_len(cands[i].class);
            let warm = model_of(i).map_or(0, |m| self.workers.warm_count(m));
            waiting > SPREAD_JOBS_PER_GPU * warm
        });
        under.max_by_key(|&i| (need(i), Reverse(i))).or(Some(0))
    }
}
