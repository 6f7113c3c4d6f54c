//! The `[broker.placement]` table: how the broker weighs model loads against
//! waiting when it places jobs (docs/performance.md, "Keeping GPUs busy").

use serde::{Deserialize, Serialize};

use crate::{invalid, ConfigError};

/// How the broker weighs model loads against waiting.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct PlacementConfig {
    /// A GPU without a job's model loads it only when the work waiting for the
    /// GPUs that have it warm, per such GPU, exceeds this many times the model's
    /// load time (both learned from finished jobs), or once idle GPUs have been
    /// left idle that long for it. Higher: fewer loads, longer waits; 0: an
    /// idle GPU loads a measured model as soon as one of its jobs waits. The
    /// default was chosen with the fleet benchmark.
    pub load_weight: f64,
    /// Fairness bound, in seconds: a job at the head of its client's line that
    /// has waited this long goes before any warm work of other jobs (it still
    /// waits for a GPU with its model warm when a load would not pay).
    pub fairness_bound_s: u64,
}

impl Default for PlacementConfig {
    fn default() -> Self {
        PlacementConfig {
            load_weight: 6.0,
            fairness_bound_s: 120,
        }
    }
}

impl PlacementConfig {
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if !(self.load_weight.is_finite() && (0.0..=1000.0).contains(&self.load_weight)) {
            return invalid(
                "broker.placement.load_weight",
                "must be a number from 0 to 1000",
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_load_weight_out_of_range_names_the_key() {
        for bad in [-1.0, f64::NAN, f64::INFINITY, 1001.0] {
            let p = PlacementConfig {
                load_weight: bad,
                ..PlacementConfig::default()
            };
            match p.validate() {
                Err(ConfigError::Invalid { key, .. }) => {
                    assert_eq!(key, "broker.placement.load_weight")
                }
                other => panic!("{bad}: {other:?}"),
            }
        }
        PlacementConfig::default().validate().unwrap();
    }
}
