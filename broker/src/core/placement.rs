//! Placement: which worker a job goes to, and which job a worker takes next.
//!
//! A model load costs tens of seconds on a real GPU, often more than the
//! generation itself, so placement counts it, with the load and generation
//! times it learned per model (see [`super::costs`]):
//!
//! - A job runs where its model is resident ("warm") when such a worker is free.
//! - **Waiting for warm**: a GPU without the model (idle or about to be) takes a
//!   job of a model that some online GPU has warm only when the model's waiting
//!   work per warm GPU (its queued jobs times its generation time, over its warm
//!   GPUs, plus what the job would wait for a holder) exceeds `load_weight` times
//!   its load time. Otherwise the job waits for a warm GPU and the idle one stays
//!   idle: its load would cost more than the wait. A model no GPU has warm, or
//!   whose costs are not measured yet (no attempt of it finished), is loaded.
//! - **The wait ends by itself**: once idle GPUs have been left idle for a
//!   model's jobs for `load_weight` times its load time, the next idle GPU loads
//!   it whatever the estimate said (ski rental: pay rent up to the purchase
//!   price, then buy), so a wrong estimate (warm GPUs busy with other models)
//!   costs a bounded wait. A job held by a GPU whose current attempt overruns
//!   its expected time is taken over by an idle GPU in the same way.
//! - **Burst spread**: so a burst of one model spreads over more GPUs while its
//!   queue is worth another load, and stops spreading when it is not: each GPU
//!   that takes the model counts as warm for it from its assignment on.
//! - A worker that is free takes, among the jobs it could run next (the oldest of
//!   each class of the next 8 clients in rotation, at the top priority), one
//!   whose model it has warm, clients in their round-robin order. With none
//!   warm, it loads the model whose waiting jobs have the most work per warm GPU
//!   among those worth a load.
//! - **Fairness bound**: priorities are not crossed (a worker that is free, or
//!   will be before a holder, takes over a more urgent held job before a queued
//!   one; a held job still waits for its holder when that one overruns its
//!   estimate), and a job at the head of
//!   its client's line that has waited `affinity_max_wait_ms`
//!   (`broker.placement.fairness_bound_s`, default 120 s) goes before any warm
//!   work on a worker that has its model warm or for which a load pays, clients
//!   in round-robin order. Within that bound a client's jobs of a warm model may
//!   pass its older jobs of another model; jobs of one class stay FIFO.

use std::cmp::Reverse;

use kiln_protocol::JobId;

use super::registry::WorkerIdx;
use super::{Core, Output};

/// How well a worker suits a job; higher is better.
pub(super) type Key = (bool, u64, Reverse<WorkerIdx>);

/// Clients whose next jobs a free worker considers, in rotation order: bounds
/// the cost of a decision with thousands of clients waiting.
const CANDIDATE_CLIENTS: usize = 8;

impl Core {
    /// Ranks worker `idx` for job `id`: its model warm first, then free memory,
    /// then the lowest index (stable choices).
    pub(super) fn placement_key(&self, id: JobId, idx: WorkerIdx) -> Key {
        let job = &self.jobs[&id];
        let w = self.workers.get(idx);
        let warm = job.spec.model.as_deref().is_some_and(|m| {
            if self.cfg.load_aware {
                w.is_warm(m)
            } else {
                w.loaded_model.as_deref() == Some(m)
            }
        });
        (warm, w.gpu.free_vram_mb, Reverse(idx))
    }

    /// Whether a worker without `model` warm should load it for a job of it,
    /// rather than leave the job to the GPUs that have it (see the module docs).
    /// `ahead_ms` is what the job would wait besides the model's queue (for a
    /// held job, what its holder still has to run; negative for what the
    /// loading worker still has to run itself).
    /// `extra` counts jobs of the model not in the queue yet (the one being
    /// placed).
    pub(super) fn load_pays(&self, model: Option<&str>, ahead_ms: f64, extra: u32) -> bool {
        ahead_ms > self.load_threshold_ms(model, extra)
    }

    /// The `ahead_ms` of [`Core::load_pays`] above which a load of `model`
    /// pays: the same for every worker, so a decision over many workers
    /// computes it once. `-inf` when a load always pays (no model, nothing
    /// warm, placement not load-aware), `+inf` when it never does.
    pub(super) fn load_threshold_ms(&self, model: Option<&str>, extra: u32) -> f64 {
        let Some(model) = model else {
            return f64::NEG_INFINITY;
        };
        if !self.cfg.load_aware {
            return f64::NEG_INFINITY;
        }
        let warm = self.workers.warm_count(model);
        if warm == 0 {
            return f64::NEG_INFINITY;
        }
        let waiting = self.queue.waiting_for_model(model) + extra;
        let costs = self.costs.of(model);
        let (Some(load_ms), Some(run_ms)) = (costs.load_ms, costs.run_ms) else {
            // Not measured yet: nothing says waiting would be shorter.
            return f64::NEG_INFINITY;
        };
        // Waiting for a warm GPU costs `ahead + waiting * run / warm`; a load
        // pays when that exceeds `load_weight * load`.
        self.cfg.load_weight * load_ms - waiting as f64 * run_ms / warm as f64
    }

    /// Whether `model`'s jobs have kept an idle GPU idle for as long as a load
    /// of it weighs (`load_weight` times its load time): from then on a load is
    /// worth it whatever the estimate of their wait said, so a wait that the
    /// estimate got wrong (warm GPUs busy with other models) ends by itself.
    /// The clock counts only time with a GPU left idle, not time every GPU was
    /// busy (the rent of the ski-rental problem: pay it up to the purchase
    /// price, then buy).
    fn waited_out(&self, now_ms: u64, model: Option<&str>) -> bool {
        let Some(model) = model else {
            return false;
        };
        let (Some(load_ms), Some(since)) = (
            self.costs.of(model).load_ms,
            self.queue.left_idle_since(model),
        ) else {
            return false;
        };
        now_ms.saturating_sub(since) as f64 >= self.cfg.load_weight * load_ms
    }

    /// When a model's jobs will have kept idle GPUs idle for as long as its
    /// load weighs ([`Core::waited_out`]), so idle workers must be offered the
    /// queue again: the earliest such time not offered yet, while a worker is
    /// idle.
    pub(super) fn next_reoffer_ms(&self) -> Option<u64> {
        if !self.cfg.load_aware || self.workers.idle().next().is_none() {
            return None;
        }
        self.queue
            .left_idle()
            .filter(|(_, clock)| !clock.reoffered)
            .filter_map(|(model, clock)| {
                let load_ms = self.costs.of(model).load_ms?;
                Some(clock.since_ms + (self.cfg.load_weight * load_ms).ceil() as u64)
            })
            .min()
    }

    /// Offers the queue to idle workers again because some model's wait is
    /// over ([`Core::next_reoffer_ms`]).
    pub(super) fn reoffer(&mut self, now_ms: u64, out: &mut Vec<Output>) {
        let due: Vec<String> = self
            .queue
            .left_idle()
            .filter(|(_, clock)| !clock.reoffered)
            .filter(|(model, _)| self.waited_out(now_ms, Some(model)))
            .map(|(model, _)| model.to_string())
            .collect();
        for model in &due {
            self.queue.mark_reoffered(model);
        }
        // Held jobs are not concerned: only the queue's waits end by age.
        self.offer_idle(now_ms, false, out);
    }

    /// What worker `idx` still has to run before it is free, in ms: its current
    /// attempt's expected time left (load included when it started cold). An
    /// attempt past its expected time is taken to need as long again as it has
    /// overrun, and one whose model's costs are not measured yet as long again
    /// as it has run: a GPU stuck in a long job does not keep the job it holds
    /// from an idle GPU for ever. 0 when the worker is idle.
    pub(super) fn busy_for_ms(&self, now_ms: u64, idx: WorkerIdx) -> f64 {
        let Some(r) = self.workers.get(idx).current else {
            return 0.0;
        };
        let Some(job) = self.jobs.get(&r.job_id) else {
            return 0.0;
        };
        let Some(started) = job.started_ms else {
            return 0.0;
        };
        let elapsed = now_ms.saturating_sub(started) as f64;
        let costs = job
            .spec
            .model
            .as_deref()
            .map(|m| self.costs.of(m))
            .unwrap_or_default();
        let load = if job.cold { costs.load_ms } else { Some(0.0) };
        match (load, costs.run_ms) {
            // Time left; once overrun, as long again as the overrun.
            (Some(load), Some(run)) => (load + run - elapsed).abs(),
            _ => elapsed,
        }
    }

    /// Takes the next queued job for worker `idx` among the classes `runnable`
    /// marks (see the module docs).
    pub(super) fn pop_for_worker(
        &mut self,
        now_ms: u64,
        idx: WorkerIdx,
        runnable: &[bool],
    ) -> Option<JobId> {
        let mut cands = std::mem::take(&mut self.candidates);
        self.queue.candidates(
            |class| runnable[class as usize],
            CANDIDATE_CLIENTS,
            &mut cands,
        );
        // Only what this worker would take by its own description.
        let w = self.workers.get(idx);
        cands.retain(|c| w.accepts(&self.jobs[&c.job].spec));
        if !self.cfg.load_aware {
            let first = super::queue::Queue::first_in_order(&cands);
            let job = first.map(|i| self.queue.take(&cands[i]));
            self.candidates = cands;
            return job;
        }
        let chosen = self.choose(now_ms, idx, &cands);
        self.note_declined(now_ms, idx, &cands, chosen);
        let job = chosen.map(|i| self.queue.take(&cands[i]));
        self.candidates = cands;
        job
    }

    /// Keeps the clock of [`Core::waited_out`]: an idle worker that takes
    /// nothing leaves every candidate's model waiting for warm GPUs from now on
    /// (unless it already was); one that loads a model for a job stops that
    /// model's clock.
    fn note_declined(
        &mut self,
        now_ms: u64,
        idx: WorkerIdx,
        cands: &[super::queue::Candidate],
        chosen: Option<usize>,
    ) {
        let w = self.workers.get(idx);
        match chosen {
            None if w.current.is_none() => {
                for c in cands {
                    if let Some(m) = &self.queue.requirements(c.class).model {
                        let m = m.clone();
                        self.queue.note_left_idle(&m, now_ms);
                    }
                }
            }
            Some(i) => {
                if let Some(m) = &self.queue.requirements(cands[i].class).model {
                    if !w.is_warm(m) {
                        let m = m.clone();
                        self.queue.clear_left_idle(&m);
                    }
                }
            }
            None => {}
        }
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
        let w = self.workers.get(idx);
        let model_of = |i: usize| {
            let req = self.queue.requirements(cands[i].class);
            req.model.as_deref()
        };
        let ahead = self.busy_for_ms(now_ms, idx);
        let pays = |i: usize| self.load_pays(model_of(i), -ahead, 0);
        // Candidates come in rotation order (by `turn`, then class).
        let overdue = (0..cands.len()).find(|&i| {
            let job = &self.jobs[&cands[i].job];
            now_ms.saturating_sub(job.created_ms) >= self.cfg.affinity_max_wait_ms
                && (model_of(i).is_none_or(|m| w.is_warm(m)) || pays(i))
        });
        if let Some(i) = overdue {
            return Some(i);
        }
        let warm = (0..cands.len()).find(|&i| model_of(i).is_none_or(|m| w.is_warm(m)));
        if let Some(i) = warm {
            return Some(i);
        }
        // Nothing warm: load the model with the most waiting work per warm GPU,
        // among those worth a load. A busy worker's load waits for its current
        // job as well. With no warm work to do, a GPU also loads for a job that
        // has waited as long as the load weighs.
        let worth = |i: usize| pays(i) || self.waited_out(now_ms, model_of(i));
        let need = |i: usize| {
            let model = model_of(i).unwrap_or_default();
            let waiting = self.queue.waiting_for_model(model) as u64;
            let run = self.costs.of(model).run_ms.unwrap_or(1.0).max(1.0) as u64;
            let warm = self.workers.warm_count(model) as u64;
            waiting * run / (warm + 1)
        };
        (0..cands.len())
            .filter(|&i| worth(i))
            .max_by_key(|&i| (need(i), Reverse(i)))
    }
}
