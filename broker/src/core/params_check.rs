//! Validation before dispatch: a job's `params` are checked at submit against the
//! parameter descriptions the workers sent when they registered
//! (`BackendInventory::params`), so a job no capable worker would accept is refused
//! with an `invalid_field` naming the parameter before any GPU time is spent; and
//! its LoRAs and template against what those workers have installed (their
//! inventory's LoRA entries, their description's template sets), refused as
//! `unschedulable` naming the field, as a missing model is.

use kiln_protocol::{JobSpec, ProtocolError};

use super::queue::Requirements;
use super::{Core, Worker};

impl Core {
    /// Whether `w` counts as part of the fleet at `now_ms`: online, or offline for
    /// less than the fleet memory (it may come back).
    pub(super) fn in_fleet(&self, now_ms: u64, w: &Worker) -> bool {
        w.online || now_ms.saturating_sub(w.last_seen_ms) < self.cfg.fleet_memory_ms
    }

    /// Accepts the job when some worker that could run it has its template and
    /// every one of its LoRAs installed (or described nothing: a worker older than
    /// the descriptions checks when it runs); otherwise the field at fault
    /// (`job.template`, `job.loras[i]`) and why, from the first such worker.
    pub(super) fn check_installed(
        &self,
        now_ms: u64,
        req: &Requirements,
        spec: &JobSpec,
    ) -> Result<(), (String, String)> {
        if spec.loras.is_empty() && spec.template.is_none() {
            return Ok(());
        }
        let mut refusal = None;
        let capable = self
            .workers
            .iter()
            .map(|(_, w)| w)
            .filter(|w| self.in_fleet(now_ms, w) && w.can_run(req));
        for w in capable {
            let Some(inventory) = w.backends.iter().find(|b| b.backend == spec.backend) else {
                continue;
            };
            let Some(schema) = &inventory.params else {
                return Ok(());
            };
            let nowhere = |what: String| {
                format!(
                    "{what} is not installed on any {} worker that could run the job",
                    spec.backend
                )
            };
            let missing = if let Some(t) = spec
                .template
                .as_ref()
                .filter(|t| !schema.sets.iter().any(|s| s.template.as_ref() == Some(*t)))
            {
                Some((
                    "job.template".to_string(),
                    nowhere(format!("template {t:?}")),
                ))
            } else {
                spec.loras.iter().enumerate().find_map(|(i, lora)| {
                    let listed = inventory.models.iter().any(|m| {
                        m.name == lora.name && m.kind.to_ascii_lowercase().starts_with("lora")
                    });
                    (!listed).then(|| {
                        (
                            format!("job.loras[{i}]"),
                            nowhere(format!("LoRA {:?}", lora.name)),
                        )
                    })
                })
            };
            match missing {
                None => return Ok(()),
                Some(m) => {
                    refusal.get_or_insert(m);
                }
            }
        }
        refusal.map_or(Ok(()), Err)
    }

    /// Accepts the job when some worker that could run it accepts its params (or
    /// described none: a worker older than the descriptions checks when it runs);
    /// otherwise the first refusal, naming the field.
    pub(super) fn check_params(
        &self,
        now_ms: u64,
        req: &Requirements,
        spec: &JobSpec,
    ) -> Result<(), ProtocolError> {
        let mut refusal = None;
        let capable = self
            .workers
            .iter()
            .map(|(_, w)| w)
            .filter(|w| self.in_fleet(now_ms, w) && w.can_run(req));
        for w in capable {
            let schema = w
                .backends
                .iter()
                .find(|b| b.backend == spec.backend)
                .and_then(|b| b.params.as_ref());
            let Some(schema) = schema else {
                return Ok(());
            };
            match schema.check(spec) {
                Ok(()) => return Ok(()),
                Err(e) => {
                    refusal.get_or_insert(e);
                }
            }
        }
        refusal.map_or(Ok(()), Err)
    }
}
