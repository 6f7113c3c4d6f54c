//! Validation before dispatch, and dispatch that keeps to it: each worker
//! describes what it takes (`BackendInventory::params`, the parameter description
//! it sent when it registered, and its inventory's LoRA entries). At submit a job
//! is accepted when some worker that could run it would take it; otherwise it is
//! refused before any GPU time is spent: `unschedulable` naming `job.template` or
//! `job.loras[i]` when no such worker has them installed (as a missing model is),
//! else `invalid_field` naming the parameter. Dispatch then gives a job only to a
//! worker that would take it ([`Worker::accepts`]), so a job accepted because one
//! worker takes it never runs, and fails, on another that does not.

use kiln_protocol::{JobSpec, ProtocolError};

use super::queue::Requirements;
use super::{Core, Worker};

/// Why a worker would refuse a job by its own description.
#[derive(Debug)]
pub(super) enum Refusal {
    /// A template or LoRA it does not have installed: the field and what it is
    /// (`job.loras[0]`, `LoRA "ink.safetensors"`).
    Missing { field: String, what: String },
    /// A parameter it does not take, naming it.
    Params(ProtocolError),
}

impl Worker {
    /// Why this worker would refuse `spec` by what it described, or `None` when
    /// it would take it, or describes nothing for the backend (a worker older
    /// than the descriptions checks when it runs).
    pub(super) fn refusal(&self, spec: &JobSpec) -> Option<Refusal> {
        let inventory = self.backends.iter().find(|b| b.backend == spec.backend)?;
        let schema = inventory.params.as_ref()?;
        if let Some(t) = &spec.template {
            if !schema.sets.iter().any(|s| s.template.as_ref() == Some(t)) {
                return Some(Refusal::Missing {
                    field: "job.template".into(),
                    what: format!("template {t:?}"),
                });
            }
        }
        for (i, lora) in spec.loras.iter().enumerate() {
            let listed = inventory
                .models
                .iter()
                .any(|m| m.name == lora.name && m.kind.to_ascii_lowercase().starts_with("lora"));
            if !listed {
                return Some(Refusal::Missing {
                    field: format!("job.loras[{i}]"),
                    what: format!("LoRA {:?}", lora.name),
                });
            }
        }
        schema.check(spec).err().map(Refusal::Params)
    }

    /// Whether this worker would take `spec` (see [`Worker::refusal`]).
    pub(super) fn accepts(&self, spec: &JobSpec) -> bool {
        self.refusal(spec).is_none()
    }
}

impl Core {
    /// Whether `w` counts as part of the fleet at `now_ms`: online, or offline for
    /// less than the fleet memory (it may come back).
    pub(super) fn in_fleet(&self, now_ms: u64, w: &Worker) -> bool {
        w.online || now_ms.saturating_sub(w.last_seen_ms) < self.cfg.fleet_memory_ms
    }

    /// At submit: `Ok` when some worker that could run the job would take it.
    /// Otherwise the answer: a parameter refusal from a worker that has the job's
    /// template and LoRAs, when there is one, else what the first worker misses.
    pub(super) fn check_described(
        &self,
        now_ms: u64,
        req: &Requirements,
        spec: &JobSpec,
    ) -> Result<(), Refusal> {
        let mut missing = None;
        let mut params = None;
        let capable = self
            .workers
            .iter()
            .map(|(_, w)| w)
            .filter(|w| self.in_fleet(now_ms, w) && w.can_run(req));
        for w in capable {
            match w.refusal(spec) {
                None => return Ok(()),
                Some(r @ Refusal::Missing { .. }) => {
                    missing.get_or_insert(r);
                }
                Some(r @ Refusal::Params(_)) => {
                    params.get_or_insert(r);
                }
            }
        }
        params.or(missing).map_or(Ok(()), Err)
    }
}
