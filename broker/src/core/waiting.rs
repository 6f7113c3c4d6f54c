//! Why a queued job waits, for `kiln status` and every client's `get`.

use kiln_protocol::job::{WaitReason, Waiting};
use kiln_protocol::JobState;

use super::job::Job;
use super::Core;

impl Core {
    /// The reason a queued job has not started (`None` for other states). Looks
    /// at every worker: for `get` replies, not for scheduling.
    pub(super) fn waiting(&self, job: &Job) -> Option<Waiting> {
        if job.state != JobState::Queued {
            return None;
        }
        let wait = |reason, detail: String| Some(Waiting { reason, detail });
        if job.held {
            let w = job.worker.as_deref().unwrap_or("a worker");
            return wait(
                WaitReason::Held,
                format!("held by {w}: starts the moment its current job ends"),
            );
        }
        let req = self.requirements(job.id);
        let any_vram = super::Requirements {
            min_vram_mb: 0,
            ..req.clone()
        };
        let (mut capable, mut up, mut busy) = (0u32, 0u32, 0u32);
        let (mut fits_otherwise, mut small_idle, mut largest) = (0u32, 0u32, 0u64);
        for (_, w) in self.workers.iter() {
            let online = w.online && w.backend_healthy(req.backend);
            if w.can_run(&req) {
                capable += 1;
                if online {
                    up += 1;
                    busy += w.current.is_some() as u32;
                }
            } else if w.can_run(&any_vram) {
                fits_otherwise += 1;
                largest = largest.max(w.gpu.total_vram_mb);
                small_idle += (online && w.current.is_none()) as u32;
            }
        }
        let backend = req.backend;
        if capable == 0 {
            if fits_otherwise > 0 {
                return wait(
                    WaitReason::BiggerGpu,
                    format!(
                        "needs {} MiB; the largest GPU that could run it has {largest} MiB",
                        req.min_vram_mb
                    ),
                );
            }
            return wait(
                WaitReason::NoCapableWorker,
                format!(
                    "no registered worker has what it needs ({backend} backend, model, labels)"
                ),
            );
        }
        if up == 0 {
            return wait(
                WaitReason::BackendDown,
                format!("its {capable} capable worker(s) are offline or their {backend} backend is down"),
            );
        }
        if let Some(w) = self.waiting_for_warm(job, up - busy) {
            return Some(w);
        }
        if small_idle > 0 && busy == up {
            return wait(
                WaitReason::BiggerGpu,
                format!(
                    "needs {} MiB: the {busy} GPU(s) that big are busy while {small_idle} smaller one(s) are idle",
                    req.min_vram_mb
                ),
            );
        }
        wait(
            WaitReason::AllBusy,
            format!(
                "all {up} worker(s) that can run it are busy; {} job(s) ahead",
                self.queue_position(job)
                    .map_or("some".to_string(), |n| n.to_string())
            ),
        )
    }

    /// `idle` capable GPUs are idle, yet the job waits: its model is warm
    /// elsewhere and a load does not pay (see [`super::placement`]).
    fn waiting_for_warm(&self, job: &Job, idle: u32) -> Option<Waiting> {
        let model = job.spec.model.as_deref()?;
        let warm = self.workers.warm_count(model);
        if idle == 0 || warm == 0 || !self.cfg.load_aware {
            return None;
        }
        // Unmeasured models are loaded, not waited for.
        let costs = self.costs.of(model);
        let (Some(load), Some(run)) = (costs.load_ms, costs.run_ms) else {
            return None;
        };
        let queued = self.queue.waiting_for_model(model) as f64;
        let weight = self.cfg.load_weight;
        let detail = format!(
            "waits for one of the {warm} GPU(s) with {model} loaded: about {:.0} s of its work is queued per such GPU, less than the {:.0} s a load on one of the {idle} idle GPU(s) weighs ({weight} x its {:.0} s load); an idle GPU loads it once it has waited for it that long",
            queued * run / warm as f64 / 1000.0,
            weight * load / 1000.0,
            load / 1000.0
        );
        Some(Waiting {
            reason: WaitReason::WarmGpu,
            detail,
        })
    }
}
