//! Validation before dispatch: a job's `params` are checked at submit against the
//! parameter descriptions the workers sent when they registered
//! (`BackendInventory::params`), so a job no capable worker would accept is refused
//! with an `invalid_field` naming the parameter before any GPU time is spent.

use kiln_protocol::{JobSpec, ProtocolError};

use super::queue::Requirements;
use super::{Core, Worker};

impl Core {
    /// Whether `w` counts as part of the fleet at `now_ms`: online, or offline for
    /// less than the fleet memory (it may come back).
    pub(super) fn in_fleet(&self, now_ms: u64, w: &Worker) -> bool {
        w.online || now_ms.saturating_sub(w.last_seen_ms) < self.cfg.fleet_memory_ms
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
