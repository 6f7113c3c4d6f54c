//! What a model costs: how long it takes to load and to generate, learned from
//! the attempts that finished.
//!
//! Placement needs both to tell when waiting for a GPU that has a model resident
//! beats loading it on an idle one (see [`super::placement`]). Workers do not
//! declare them, and they differ by machine, so the broker measures them from
//! each successful attempt's `info`:
//!
//! - `worker_started_ms` and `worker_ended_ms` (every worker adds them): the
//!   attempt's time on the generator, load included.
//! - `load_ms` (the sim backend reports it; 0 when the model was resident): the
//!   load alone. The rest of the attempt is generation.
//! - A backend that does not report `load_ms` (ComfyUI, Wan2GP): an attempt the
//!   broker started where the model was resident is a generation sample; one
//!   started where it was not is a load sample once the generation time is
//!   known (its time minus the generation estimate).
//!
//! Each figure is an exponentially weighted mean (the newest sample weighs
//! [`WEIGHT`]), per model, over every worker: GPUs of different speeds give a
//! mean, which is what a decision about the whole fleet needs.

use std::collections::HashMap;

use serde_json::{Map, Value};

/// Weight of the newest sample in a mean.
const WEIGHT: f64 = 0.2;

/// One model's learned costs, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ModelCosts {
    /// Loading it into an idle GPU's memory; `None` until measured once.
    pub load_ms: Option<f64>,
    /// One generation, once loaded; `None` until measured once.
    pub run_ms: Option<f64>,
}

/// Learned costs per model name.
#[derive(Debug, Default)]
pub struct Costs {
    models: HashMap<String, ModelCosts>,
}

fn mean(old: Option<f64>, sample: f64) -> Option<f64> {
    Some(old.map_or(sample, |m| m + WEIGHT * (sample - m)))
}

fn field(info: &Map<String, Value>, key: &str) -> Option<u64> {
    info.get(key).and_then(Value::as_u64)
}

impl Costs {
    /// What `model` is known to cost.
    pub fn of(&self, model: &str) -> ModelCosts {
        self.models.get(model).copied().unwrap_or_default()
    }

    /// Learns from a successful attempt of `model` with result `info`; `cold`
    /// says whether the model was not resident on its worker when the broker
    /// assigned the attempt (used only when `info` has no `load_ms`).
    pub fn observe(&mut self, model: &str, info: &Map<String, Value>, cold: bool) {
        let took = match (
            field(info, "worker_started_ms"),
            field(info, "worker_ended_ms"),
        ) {
            (Some(start), Some(end)) if end >= start => Some((end - start) as f64),
            _ => None,
        };
        let reported_load = field(info, "load_ms");
        if took.is_none() && reported_load.is_none_or(|l| l == 0) {
            return;
        }
        let c = self.models.entry(model.to_string()).or_default();
        match reported_load {
            Some(load) => {
                if load > 0 {
                    c.load_ms = mean(c.load_ms, load as f64);
                }
                if let Some(took) = took {
                    c.run_ms = mean(c.run_ms, (took - load as f64).max(0.0));
                }
            }
            None => {
                let Some(took) = took else { return };
                if !cold {
                    c.run_ms = mean(c.run_ms, took);
                } else if let Some(run) = c.run_ms {
                    c.load_ms = mean(c.load_ms, (took - run).max(0.0));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn info(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn a_reported_load_splits_the_attempt_into_load_and_generation() {
        let mut c = Costs::default();
        let cold =
            info(json!({"worker_started_ms": 1_000, "worker_ended_ms": 16_000, "load_ms": 9_000}));
        c.observe("sdxl", &cold, true);
        assert_eq!(c.of("sdxl").load_ms, Some(9_000.0));
        assert_eq!(c.of("sdxl").run_ms, Some(6_000.0));
        // A warm run (load_ms 0) is a generation sample only.
        let warm = info(json!({"worker_started_ms": 0, "worker_ended_ms": 11_000, "load_ms": 0}));
        c.observe("sdxl", &warm, false);
        assert_eq!(c.of("sdxl").load_ms, Some(9_000.0));
        assert_eq!(c.of("sdxl").run_ms, Some(6_000.0 + 0.2 * 5_000.0));
        assert_eq!(c.of("flux"), ModelCosts::default());
    }

    #[test]
    fn without_a_reported_load_cold_and_warm_attempts_are_told_apart() {
        let mut c = Costs::default();
        let attempt =
            |ms: u64| info(json!({"worker_started_ms": 500, "worker_ended_ms": 500 + ms}));
        // A cold attempt before any warm one: nothing to split it with.
        c.observe("flux", &attempt(43_000), true);
        assert_eq!(c.of("flux"), ModelCosts::default());
        c.observe("flux", &attempt(18_000), false);
        assert_eq!(c.of("flux").run_ms, Some(18_000.0));
        c.observe("flux", &attempt(43_000), true);
        assert_eq!(c.of("flux").load_ms, Some(25_000.0));
        // No timing at all: nothing learned.
        c.observe("flux", &info(json!({"seed": 3})), false);
        assert_eq!(c.of("flux").run_ms, Some(18_000.0));
    }
}
