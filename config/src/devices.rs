//! `[worker.gpu]` and `[worker.sim]`: the GPU a worker drives, and the simulator that
//! stands in for one.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Which GPU a worker drives, and what to report when NVML cannot say.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct GpuConfig {
    /// NVML index (PCI bus order) of the GPU this worker drives.
    pub index: u32,
    /// Ask NVML. `false` uses only the values below.
    pub nvml: bool,
    /// Path of `libnvidia-ml.so.1` when it is not on the loader path.
    #[schemars(example = &"/usr/lib/x86_64-linux-gnu/libnvidia-ml.so.1")]
    pub nvml_library: Option<PathBuf>,
    /// Declared GPU name, used when NVML is absent or disabled.
    #[schemars(example = &"NVIDIA GeForce RTX 4090")]
    pub name: Option<String>,
    /// Declared memory in MiB, used when NVML is absent or disabled, or to cap it.
    #[schemars(example = 24564)]
    pub total_vram_mb: Option<u64>,
    /// Declared GPU UUID, used when NVML is absent or disabled.
    #[schemars(example = &"GPU-5f2a8c1e-0000-0000-0000-000000000000")]
    pub uuid: Option<String>,
    /// Declare unified memory (DGX Spark GB10, Jetson) when NVML is absent.
    #[schemars(example = true)]
    pub unified_memory: Option<bool>,
}

impl Default for GpuConfig {
    fn default() -> Self {
        GpuConfig {
            index: 0,
            nvml: true,
            nvml_library: None,
            name: None,
            total_vram_mb: None,
            uuid: None,
            unified_memory: None,
        }
    }
}

/// The built-in `sim` backend: real PNGs, simulated time, no GPU.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct SimConfig {
    /// Time per reported step.
    pub step_ms: u64,
    /// Steps when the job does not set `params.steps`.
    pub default_steps: u32,
    /// Simulated model load time when a job switches model.
    pub load_ms: u64,
    /// Model names the simulator claims to have installed.
    pub models: Vec<String>,
    /// Honour `params.fault` (`fail`, `oom`, `hang`, `crash`); for tests only.
    pub allow_faults: bool,
    /// Largest image side the simulator will render.
    pub max_side: u32,
    /// GPU memory the simulator models: models stay resident up to it and the
    /// least recently used is evicted to load another (0 = no limit).
    pub vram_mb: u64,
    /// Generation speed of the simulated GPU relative to the reference (an RTX
    /// 4090 = 1.0): a step takes `step_ms / speed`. Loads do not scale with it.
    pub speed: f64,
    /// Memory and load time per model; a model without a profile takes no
    /// memory and loads in `load_ms`.
    pub profiles: Vec<SimModelProfile>,
}

/// What one model costs on the simulated GPU.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SimModelProfile {
    pub name: String,
    /// GPU memory its weights take.
    pub vram_mb: u64,
    /// Load time from disk into the GPU.
    pub load_ms: u64,
}

impl SimModelProfile {
    fn new(name: &str, vram_mb: u64, load_ms: u64) -> SimModelProfile {
        SimModelProfile {
            name: name.into(),
            vram_mb,
            load_ms,
        }
    }
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            step_ms: 50,
            default_steps: 20,
            load_ms: 0,
            models: vec!["sim-sd15".into(), "sim-sdxl".into(), "sim-wan".into()],
            allow_faults: false,
            max_side: 2048,
            vram_mb: 24_576,
            speed: 1.0,
            // Sizes of the weights of real models and the time a local NVMe
            // takes to load them (docs/performance.md says where they come
            // from). The `sim-*` models have no profile: no memory, `load_ms`.
            profiles: vec![
                SimModelProfile::new("sdxl-base-1.0", 7_066, 9_000),
                SimModelProfile::new("flux1-dev-fp8", 12_186, 25_000),
                SimModelProfile::new("wan2.1-t2v-14b-fp8", 15_360, 60_000),
            ],
        }
    }
}
